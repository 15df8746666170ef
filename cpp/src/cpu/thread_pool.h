// A small persistent pool of std::threads for the CPU walks (no OpenMP: several OpenMP
// runtimes in one Python process oversubscribe the cores, and libgomp breaks after fork).
#pragma once

namespace fastsgd {
namespace cpu {

// Number of threads a step may use: FASTSGD_NUM_THREADS, else the CPUs this process may run on.
int configured_threads();

// Caps the threads later steps use (tests compare 1 and 2 threads in one process); 0 restores
// the configured number, and a cap above it has no effect.
void set_thread_limit(int threads);
int thread_limit();

// Runs task(context, i) for every i in [0, count) on up to configured_threads() threads, the
// calling thread included, and returns when all are done. If another step holds the pool,
// the caller runs every task itself, so concurrent optimizers never deadlock.
void parallel_run(int count, void (*task)(void* context, int index), void* context);

}  // namespace cpu
}  // namespace fastsgd
