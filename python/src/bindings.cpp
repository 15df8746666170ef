// fastsgd._core: the thin layer between Python objects and the C++ engine. It turns NumPy
// arrays (read straight from the array struct) and DLPack producers (the DLPack 1.3 C exchange
// API where the type offers it, else __dlpack__) into non-owning views, zero-copy, refuses
// anything it cannot update in place, and runs the engine with the GIL released.
// No math and no policy here: those live in the engine and in the Python facade.
#include <pybind11/native_enum.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fastsgd/dlpack.h"
#include "fastsgd/sgd.h"

namespace py = pybind11;
using namespace fastsgd;

namespace {

constexpr int kNpyHalf = 23, kNpyFloat = 11, kNpyDouble = 12, kNpyUserDef = 256;

std::string where(const char* what, size_t i) { return std::string(what) + "[" + std::to_string(i) + "]"; }

std::string type_name(py::handle obj) { return Py_TYPE(obj.ptr())->tp_name; }

// A tensor as the engine sees it, plus the shape for grad/variable checks.
struct Imported {
  TensorView view;
  int ndim = 0;
  const int64_t* shape = nullptr;
};

// DLPack tensors taken over during one call; their deleters run when the call ends, with
// the GIL held (NumPy's and CuPy's deleters need it).
class Owned {
 public:
  ~Owned() { release(); }
  void add_versioned(dlpack::ManagedTensorVersioned* t) { versioned_.push_back(t); }
  void add_legacy(dlpack::ManagedTensor* t) { legacy_.push_back(t); }
  void release() {
    for (auto* t : versioned_)
      if (t->deleter) t->deleter(t);
    for (auto* t : legacy_)
      if (t->deleter) t->deleter(t);
    versioned_.clear();
    legacy_.clear();
  }

 private:
  std::vector<dlpack::ManagedTensorVersioned*> versioned_;
  std::vector<dlpack::ManagedTensor*> legacy_;
};

// Every object imported during one call stays referenced until the call ends: while the
// engine runs with the GIL released, another thread may drop the caller's last reference to
// a gradient (e.g. by clearing the list it came from), which would free the buffer mid-step.
// The references live on one per-thread stack, reused across calls (no allocation per step
// once warm); contexts nest (an import may run Python code that steps another optimizer), so
// each one releases only what it pushed.
class KeepAlive {
 public:
  KeepAlive() : base_(stack().size()) {}
  KeepAlive(const KeepAlive&) = delete;
  KeepAlive& operator=(const KeepAlive&) = delete;
  ~KeepAlive() { release(); }
  void add(PyObject* obj) {  // takes a new reference
    Py_INCREF(obj);
    stack().push_back(obj);
  }
  void add_owned(PyObject* obj) { stack().push_back(obj); }  // steals a reference
  void release() {  // with the GIL held
    auto& s = stack();
    while (s.size() > base_) {
      PyObject* obj = s.back();
      s.pop_back();
      Py_DECREF(obj);
    }
  }

 private:
  static std::vector<PyObject*>& stack() {
    thread_local std::vector<PyObject*> s;
    return s;
  }
  size_t base_;
};

DType numpy_dtype(py::handle arr, const char* what, size_t i) {
  auto* descr = py::detail::array_descriptor_proxy(py::detail::array_proxy(arr.ptr())->descr);
  if (descr->byteorder == '>')
    throw TypeError(where(what, i) + " has non-native byte order; fastsgd updates native-endian floats only");
  switch (descr->type_num) {
    case kNpyFloat: return DType::float32;
    case kNpyDouble: return DType::float64;
    case kNpyHalf: return DType::float16;
    default: break;
  }
  if (descr->type_num >= kNpyUserDef && descr->kind == 'V') {
    // ml_dtypes registers bfloat16 as a NumPy user type; its number is fixed once registered.
    static int bf16 = -1;
    if (bf16 < 0 && py::str(py::handle(reinterpret_cast<PyObject*>(descr))).cast<std::string>() == "bfloat16")
      bf16 = descr->type_num;
    if (descr->type_num == bf16) return DType::bfloat16;
  }
  throw TypeError(where(what, i) + " has dtype " +
                  py::str(py::handle(reinterpret_cast<PyObject*>(descr))).cast<std::string>() +
                  "; expected float16, bfloat16, float32 or float64");
}

void import_numpy(py::handle obj, bool writable, const char* what, size_t i, Imported& out) {
  auto* a = py::detail::array_proxy(obj.ptr());
  const DType dtype = numpy_dtype(obj, what, i);
  using api = py::detail::npy_api;
  if (!(a->flags & api::NPY_ARRAY_C_CONTIGUOUS_))
    throw ValueError(where(what, i) + " is not C-contiguous; fastsgd updates buffers in place and "
                     "never copies: pass a contiguous array");
  if (!(a->flags & api::NPY_ARRAY_ALIGNED_))
    throw ValueError(where(what, i) + " is not aligned to its element size");
  if (writable && !(a->flags & api::NPY_ARRAY_WRITEABLE_))
    throw ValueError(where(what, i) + " is read-only; variables must be writeable arrays");
  int64_t numel = 1;
  for (int d = 0; d < a->nd; ++d) numel *= int64_t(a->dimensions[d]);
  out.view.data = a->data;
  out.view.numel = numel;
  out.view.dtype = dtype;
  out.view.device = Device{};
  out.ndim = a->nd;
  static_assert(sizeof(Py_intptr_t) == sizeof(int64_t), "64-bit platforms only");
  out.shape = reinterpret_cast<const int64_t*>(a->dimensions);
}

// A DLPack dtype as numpy/torch spell it (int16, uint8, bool, ...), for refusals; codes without
// such a name (float8 variants, ...) as "DLPack code C, B bits".
std::string dlpack_dtype_name(const dlpack::DataType& d) {
  if (d.code == 6) return "bool";
  static const char* const kinds[] = {"int", "uint", "float", "opaque", "bfloat", "complex"};
  if (d.code < 6) return kinds[d.code] + std::to_string(d.bits);
  return "DLPack code " + std::to_string(d.code) + ", " + std::to_string(d.bits) + " bits";
}

// Validates a DLPack tensor and fills `out`.
void from_dltensor(const dlpack::Tensor& t, bool writable, bool read_only_flag, const char* what, size_t i,
                   Imported& out) {
  if (writable && read_only_flag)
    throw ValueError(where(what, i) + " is exported read-only (DLPack READ_ONLY flag); variables must be writeable");
  if (t.dtype.lanes != 1) throw TypeError(where(what, i) + " has a vector dtype (lanes != 1)");
  DType dtype;
  if (t.dtype.code == dlpack::kFloat && t.dtype.bits == 32) dtype = DType::float32;
  else if (t.dtype.code == dlpack::kFloat && t.dtype.bits == 64) dtype = DType::float64;
  else if (t.dtype.code == dlpack::kFloat && t.dtype.bits == 16) dtype = DType::float16;
  else if (t.dtype.code == dlpack::kBfloat && t.dtype.bits == 16) dtype = DType::bfloat16;
  else
    throw TypeError(where(what, i) + " has dtype " + dlpack_dtype_name(t.dtype) +
                    "; expected float16, bfloat16, float32 or float64");
  Device device;
  switch (t.device.device_type) {
    case dlpack::kCPU:
    case dlpack::kCUDAHost: device = Device{DeviceKind::cpu, 0}; break;
    case dlpack::kCUDA:
    case dlpack::kCUDAManaged: device = Device{DeviceKind::cuda, t.device.device_id}; break;
    default:
      throw ValueError(where(what, i) + " lives on DLPack device type " + std::to_string(t.device.device_type) +
                       "; fastsgd updates CPU and CUDA memory");
  }
  int64_t numel = 1;
  for (int d = 0; d < t.ndim; ++d) numel *= t.shape[d];
  if (t.strides && numel > 1) {
    int64_t expected = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      if (t.shape[d] == 1) continue;
      if (t.strides[d] != expected)
        throw ValueError(where(what, i) + " is not contiguous (strided, broadcast or reversed view); "
                         "fastsgd updates buffers in place and never copies: pass a contiguous tensor");
      expected *= t.shape[d];
    }
  }
  char* data = static_cast<char*>(t.data) + t.byte_offset;
  // An unaligned element pointer (torch.frombuffer(..., offset=1)) is undefined behaviour on
  // the CPU and a fatal misaligned access on CUDA.
  if (numel > 0 && reinterpret_cast<uintptr_t>(data) % dtype_size(dtype) != 0)
    throw ValueError(where(what, i) + " is not aligned to its element size (" + std::to_string(dtype_size(dtype)) +
                     " bytes); fastsgd never copies: pass an aligned tensor");
  out.view.data = data;
  out.view.numel = numel;
  out.view.dtype = dtype;
  out.view.device = device;
  out.ndim = t.ndim;
  out.shape = t.shape;
}

// type -> its DLPack C exchange API table (or null). Types live as long as the process.
const dlpack::ExchangeAPI* exchange_api(PyTypeObject* type) {
  static std::unordered_map<PyTypeObject*, const dlpack::ExchangeAPI*> cache;
  auto it = cache.find(type);
  if (it != cache.end()) return it->second;
  const dlpack::ExchangeAPI* api = nullptr;
  PyObject* cap = PyObject_GetAttrString(reinterpret_cast<PyObject*>(type), "__dlpack_c_exchange_api__");
  if (cap) {
    if (PyCapsule_IsValid(cap, "dlpack_exchange_api")) {
      auto* table = static_cast<const dlpack::ExchangeAPI*>(PyCapsule_GetPointer(cap, "dlpack_exchange_api"));
      if (table && table->header.version.major == 1 && table->dltensor_from_py_object_no_sync) api = table;
    }
    Py_DECREF(cap);
  } else {
    PyErr_Clear();
  }
  cache.emplace(type, api);
  return api;
}

bool is_jax_array(py::handle obj) {
  py::object module = py::getattr(py::type::handle_of(obj), "__module__", py::none());
  if (!py::isinstance<py::str>(module)) return false;
  const std::string m = module.cast<std::string>();
  return m.rfind("jax", 0) == 0;
}

// Per-call import context: the consumer stream for CUDA producers, and the exchange API
// that can name the producer's current stream.
struct ImportContext {
  KeepAlive keep;  // declared first: released last, after the DLPack deleters
  Owned owned;
  dlpack::Tensor scratch{};
  long long stream = -2;  // explicit cudaStream_t handle, or -2 when none was given
  const dlpack::ExchangeAPI* cuda_api = nullptr;
};

// Whether a failure raised by a producer while exporting is the input's fault (to be refused
// as TypeError/ValueError) rather than something to pass through (KeyboardInterrupt, MemoryError).
bool is_export_failure(const py::error_already_set& e) {
  return e.matches(PyExc_Exception) && !e.matches(PyExc_MemoryError);
}

// A producer's own refusal (torch's RuntimeError for sparse, meta or quantized tensors, a
// BufferError from __dlpack__, ...) as a TypeError naming the argument; its ValueError stays one.
[[noreturn]] void refuse_export(const py::error_already_set& e, py::handle obj, const char* what, size_t i) {
  std::string reason = e.what();
  reason = reason.substr(0, reason.find('\n'));  // torch appends a C++ backtrace
  const std::string msg = where(what, i) + " (a " + type_name(obj) + ") cannot be read in place: " + reason;
  if (e.matches(PyExc_ValueError)) throw ValueError(msg);
  throw TypeError(msg);
}

// torch's lazily negated views (x._neg_view(), complex.conj().imag) export the un-negated
// buffer: a gradient is read through a resolved copy, a variable (which must change in
// place) is refused. Checked only for types that have `is_neg` (looked up once per type).
bool has_negative_bit(py::handle obj) {
  static std::unordered_map<PyTypeObject*, bool> has_method;
  static PyObject* name = PyUnicode_InternFromString("is_neg");  // leaked on purpose
  PyTypeObject* type = Py_TYPE(obj.ptr());
  auto it = has_method.find(type);
  if (it == has_method.end())
    it = has_method.emplace(type, PyObject_HasAttr(reinterpret_cast<PyObject*>(type), name) == 1).first;
  if (!it->second) return false;
  PyObject* r = PyObject_CallMethodNoArgs(obj.ptr(), name);
  if (!r) {
    PyErr_Clear();
    return false;
  }
  const bool neg = r == Py_True;
  Py_DECREF(r);
  return neg;
}

void import_dlpack(py::handle obj, bool writable, const char* what, size_t i, Imported& out, ImportContext& ctx) {
  PyTypeObject* type = Py_TYPE(obj.ptr());
  if (const dlpack::ExchangeAPI* api = exchange_api(type)) {
    if (has_negative_bit(obj)) {
      if (writable)
        throw ValueError(where(what, i) + " is a lazily negated torch view (negative bit set, e.g. _neg_view() or "
                         "conj().imag) and cannot be updated in place; pass a materialized tensor");
      py::object resolved;
      try {
        resolved = obj.attr("resolve_neg")();
      } catch (py::error_already_set& e) {
        if (!is_export_failure(e)) throw;
        refuse_export(e, obj, what, i);
      }
      if (Py_TYPE(resolved.ptr()) != type || has_negative_bit(resolved))
        throw TypeError(where(what, i) + " has the negative bit set and could not be resolved");
      ctx.keep.add(resolved.ptr());
      obj = resolved;
    }
    if (api->dltensor_from_py_object_no_sync(obj.ptr(), &ctx.scratch) != 0) {
      py::error_already_set e;
      if (!is_export_failure(e)) throw e;
      refuse_export(e, obj, what, i);
    }
    ctx.keep.add(obj.ptr());
    from_dltensor(ctx.scratch, writable, false, what, i, out);
    if (out.view.device.kind == DeviceKind::cuda && api->current_work_stream) ctx.cuda_api = api;
    return;
  }
  if (!py::hasattr(obj, "__dlpack__"))
    throw TypeError(where(what, i) + " is a " + type_name(obj) +
                    "; expected a NumPy array or an object with __dlpack__ (torch, CuPy, ...)");
  if (writable && is_jax_array(obj))
    throw TypeError(where(what, i) + " is a JAX array, which is immutable and cannot be updated in place; "
                    "use fastsgd.SGD.stateless_apply(), which returns new arrays");
  py::object capsule;
  py::object method = obj.attr("__dlpack__");
  // CUDA producers order their pending work before our stream: the explicit one, else the
  // legacy default stream (1), on which the engine then launches.
  py::object stream = py::none();
  try {
    if (py::hasattr(obj, "__dlpack_device__")) {
      py::object dev = obj.attr("__dlpack_device__")();
      if (!py::isinstance<py::tuple>(dev) || py::len(dev) != 2 || !py::isinstance<py::int_>(dev[py::int_(0)]))
        throw TypeError(where(what, i) + ".__dlpack_device__() did not return a (device_type, device_id) tuple");
      const long long kind = PyLong_AsLongLong(py::object(dev[py::int_(0)]).ptr());
      if (kind == -1 && PyErr_Occurred()) throw py::error_already_set();
      if (kind == dlpack::kCUDA || kind == dlpack::kCUDAManaged)
        stream = py::int_(ctx.stream > 0 ? ctx.stream : 1);
    }
    try {
      if (stream.is_none())
        capsule = method(py::arg("max_version") = py::make_tuple(1, 3), py::arg("copy") = false);
      else
        capsule = method(py::arg("stream") = stream, py::arg("max_version") = py::make_tuple(1, 3),
                         py::arg("copy") = false);
    } catch (py::error_already_set& e) {
      if (!e.matches(PyExc_TypeError)) throw;
      capsule = stream.is_none() ? method() : method(py::arg("stream") = stream);
    }
  } catch (py::error_already_set& e) {
    if (!is_export_failure(e)) throw;
    refuse_export(e, obj, what, i);
  }
  ctx.keep.add(obj.ptr());
  Owned& owned = ctx.owned;
  PyObject* cap = capsule.ptr();
  if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    auto* m = static_cast<dlpack::ManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
    PyCapsule_SetName(cap, "used_dltensor_versioned");
    owned.add_versioned(m);
    if (m->version.major != 1)
      throw TypeError(where(what, i) + " uses DLPack major version " + std::to_string(m->version.major) +
                      "; fastsgd understands version 1");
    if (m->flags & dlpack::kFlagIsCopied)
      throw ValueError(where(what, i) + " was copied by its producer during export; fastsgd needs the original buffer");
    from_dltensor(m->dl_tensor, writable, (m->flags & dlpack::kFlagReadOnly) != 0, what, i, out);
  } else if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* m = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    PyCapsule_SetName(cap, "used_dltensor");
    owned.add_legacy(m);
    from_dltensor(m->dl_tensor, writable, false, what, i, out);
  } else {
    throw TypeError(where(what, i) + ".__dlpack__() did not return a DLPack capsule");
  }
}

// numpy.generic, the base of NumPy's scalar types (np.float32(1.0), ...).
bool is_numpy_scalar(py::handle obj) {
  static PyObject* generic = [] {
    return py::object(py::module_::import("numpy").attr("generic")).release().ptr();  // leaked on purpose
  }();
  return PyObject_IsInstance(obj.ptr(), generic) == 1;
}

void import_tensor(py::handle obj, bool writable, const char* what, size_t i, Imported& out, ImportContext& ctx) {
  if (py::detail::npy_api::get().PyArray_Check_(obj.ptr())) {
    import_numpy(obj, writable, what, i, out);
    ctx.keep.add(obj.ptr());
    return;
  }
  if (is_numpy_scalar(obj)) {
    // Keras takes a 0-d gradient computed with NumPy, which is a NumPy scalar: read it through
    // a 0-d array. A variable must change in place, and a scalar is immutable.
    if (writable)
      throw TypeError(where(what, i) + " is a NumPy scalar (" + type_name(obj) +
                      "), which is immutable; variables must be arrays (a 0-d array works)");
    py::array arr = py::array::ensure(obj);
    if (!arr) throw TypeError(where(what, i) + " is a NumPy scalar that cannot be read as an array");
    import_numpy(arr, writable, what, i, out);
    ctx.keep.add(arr.ptr());
    return;
  }
  import_dlpack(obj, writable, what, i, out, ctx);
}

bool same_shape(const Imported& a, const Imported& b) {
  if (a.ndim != b.ndim) return false;
  for (int d = 0; d < a.ndim; ++d)
    if (a.shape[d] != b.shape[d]) return false;
  return true;
}

std::string shape_str(const Imported& t) {
  std::string s = "(";
  for (int d = 0; d < t.ndim; ++d) s += std::to_string(t.shape[d]) + (t.ndim == 1 || d + 1 < t.ndim ? "," : "");
  return s + ")";
}

// A record (Group, Options) with the fields named in `kwargs` assigned; TypeError for an
// unknown name or a value of the wrong type.
template <class Record>
Record assign_fields(Record record, const py::kwargs& kwargs, const char* type) {
  size_t used = 0;
  Record::fields([&](const char* name, auto member, const char*) {
    if (!kwargs.contains(name)) return;
    using T = std::decay_t<decltype(record.*member)>;
    try {
      record.*member = kwargs[name].template cast<T>();
    } catch (const py::cast_error&) {
      throw TypeError(std::string(type) + "." + name + " cannot be set from a " + type_name(kwargs[name]));
    }
    ++used;
  });
  if (used != kwargs.size()) {
    for (auto item : kwargs) {
      bool known = false;
      const std::string key = py::str(item.first);
      Record::fields([&](const char* name, auto, const char*) { known = known || key == name; });
      if (!known) throw TypeError(std::string(type) + "() got an unexpected keyword argument '" + key + "'");
    }
  }
  return record;
}

template <class Record>
std::string record_repr(const Record& record, const char* type) {
  std::string out = std::string(type) + "(";
  bool first = true;
  Record::fields([&](const char* name, auto member, const char*) {
    out += std::string(first ? "" : ", ") + name + "=" + py::repr(py::cast(record.*member)).template cast<std::string>();
    first = false;
  });
  return out + ")";
}

// The engine as Python sees it: variables are matched to slots by identity, as Keras does,
// and each call imports what it is given. Every object imported for a step is held until the
// native step has ended, so another thread dropping its last reference cannot free a buffer
// the engine is still reading.
class Engine {
 public:
  explicit Engine(const Options& options) : sgd_(options) {}

  void build(const py::sequence& variables, const std::vector<bool>& decays, const std::vector<size_t>& groups) {
    std::unique_lock<std::mutex> busy = lock();
    const size_t n = variables.size();
    std::vector<py::object> objects;
    std::vector<TensorView> views(n);
    ImportContext ctx;
    for (size_t i = 0; i < n; ++i) {
      objects.push_back(variables[i]);
      Imported im;
      import_tensor(objects.back(), true, "variables", i, im, ctx);
      views[i] = im.view;
    }
    sgd_.build(views, decays, groups);
    built_ = std::move(objects);
    index_.clear();
    for (size_t i = 0; i < n; ++i) index_.emplace(built_[i].ptr(), i);
    var_views_.resize(n);
    grad_views_.resize(n);
    for (auto& k : slot_views_) k.resize(n);
    fresh_.resize(n);
    present_.resize(n);
  }

  py::tuple step(const py::sequence& grads, const py::object& variables, std::optional<double> learning_rate,
                 const py::object& slots, const py::object& fresh_momentum, double grad_scale,
                 std::optional<bool> found_inf, std::optional<double> global_sum_squares,
                 std::optional<long long> stream) {
    std::unique_lock<std::mutex> busy = lock();
    StepRequest r;
    size_t missing = 0;
    ImportContext ctx;
    gather(grads, variables, slots, fresh_momentum, stream, r, missing, ctx, sgd_.next_step_touches_all());
    r.learning_rate = learning_rate;
    r.grad_scale = grad_scale;
    r.found_inf = found_inf;
    r.global_sum_squares = global_sum_squares;
    StepResult result;
    {
      py::gil_scoped_release nogil;
      result = sgd_.step(r);
    }
    held_.clear();
    return py::make_tuple(result.updated, result.skipped, missing);
  }

  GradStats grad_stats(const py::sequence& grads, const py::object& variables, const py::object& slots,
                       double grad_scale) {
    std::unique_lock<std::mutex> busy = lock();
    StepRequest r;
    size_t missing = 0;
    ImportContext ctx;
    gather(grads, variables, slots, py::none(), std::nullopt, r, missing, ctx, false);
    r.grad_scale = grad_scale;
    GradStats stats;
    {
      py::gil_scoped_release nogil;
      stats = sgd_.grad_stats(r);
    }
    held_.clear();
    return stats;
  }

  void finalize(const py::sequence& variables) {
    std::unique_lock<std::mutex> busy = lock();
    std::vector<TensorView> views(variables.size());
    ImportContext ctx;
    for (size_t i = 0; i < views.size(); ++i) {
      Imported im;
      held_.push_back(variables[i]);
      import_tensor(held_.back(), true, "variables", i, im, ctx);
      views[i] = im.view;
    }
    {
      py::gil_scoped_release nogil;
      sgd_.finalize_variable_values(views);
    }
    held_.clear();
  }

  py::array read_slot(SlotKind kind, size_t i) {
    std::unique_lock<std::mutex> busy = lock();
    const TensorView v = sgd_.slot(kind, i);
    if (!v.data) throw ValueError(std::string("no ") + slot_kind_name(kind) + " slots");
    const char* fmt = v.dtype == DType::float64 ? "float64" : v.dtype == DType::float32 ? "float32"
                      : v.dtype == DType::float16 ? "float16" : "uint16";
    py::array out(py::dtype(fmt), std::vector<py::ssize_t>{py::ssize_t(v.numel)});
    sgd_.read_slot(kind, i, out.mutable_data());
    return out;
  }

  void write_slot(SlotKind kind, size_t i, const py::array& values) {
    std::unique_lock<std::mutex> busy = lock();
    const TensorView v = sgd_.slot(kind, i);
    if (!v.data) throw ValueError(std::string("no ") + slot_kind_name(kind) + " slots");
    if (!(values.flags() & py::array::c_style) || values.nbytes() != v.nbytes() ||
        values.itemsize() != dtype_size(v.dtype))
      throw ValueError(std::string(slot_kind_name(kind)) + " slot " + std::to_string(i) + " expects " +
                       std::to_string(v.numel) + " contiguous " + dtype_name(v.dtype) + " values");
    sgd_.write_slot(kind, i, values.data());
  }

  py::tuple slot_spec(size_t i) const {
    const TensorView v = sgd_.slot(SlotKind::momentum, i);
    return py::make_tuple(sgd_.variable_spec(i).numel, std::string(dtype_name(v.dtype)));
  }

  // Runs `fn` on the engine while no step is running in another thread.
  template <class F>
  auto locked(F&& fn) {
    std::unique_lock<std::mutex> busy = lock();
    return fn(sgd_);
  }

  SGD& sgd() { return sgd_; }
  size_t size() const { return built_.size(); }

 private:
  // The GIL is released while the engine runs: a second thread entering the same optimizer
  // would race on its scratch buffers and state, so it is refused instead.
  std::unique_lock<std::mutex> lock() {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock())
      throw ValueError("this optimizer is running a step in another thread; calls on one optimizer must not overlap");
    return busy;
  }

  size_t position_of(py::handle var, size_t i) const {
    if (i < built_.size() && built_[i].ptr() == var.ptr()) return i;
    auto it = index_.find(var.ptr());
    if (it != index_.end()) return it->second;
    throw ValueError("Unknown variable " + where("variables", i) + " (a " + type_name(var) +
                     "): it is not one of the variables this optimizer was built with");
  }

  // Imports the tensors of one call into the per-position views of `r`.
  void gather(const py::sequence& grads, const py::object& variables, const py::object& slots,
              const py::object& fresh_momentum, std::optional<long long> stream, StepRequest& r, size_t& missing,
              ImportContext& ctx, bool touches_all) {
    if (!sgd_.built()) throw ValueError("build() the optimizer before step()");
    held_.clear();
    const size_t n_built = built_.size();
    const bool all = variables.is_none();
    const size_t n = grads.size();
    if (all && n != n_built)
      throw ValueError("got " + std::to_string(n) + " gradients for " + std::to_string(n_built) + " variables");
    py::sequence vars_seq = all ? py::sequence() : py::reinterpret_borrow<py::sequence>(variables);
    if (!all && vars_seq.size() != n)
      throw ValueError("grads and variables differ in length (" + std::to_string(n) + " and " +
                       std::to_string(vars_seq.size()) + ")");
    py::sequence slot_seqs[kNumSlotKinds];
    bool has_slots[kNumSlotKinds] = {};
    if (!slots.is_none()) {
      if (!py::isinstance<py::dict>(slots)) throw TypeError("slots must be a dict {SlotKind: list} or None");
      for (auto item : py::reinterpret_borrow<py::dict>(slots)) {
        int k;
        try {
          k = int(item.first.cast<SlotKind>());
        } catch (const py::cast_error&) {
          throw TypeError("slots keys must be SlotKind values, got a " + type_name(item.first));
        }
        if (!py::isinstance<py::sequence>(item.second) || py::isinstance<py::str>(item.second))
          throw TypeError(std::string("slots[") + slot_kind_name(SlotKind(k)) + "] must be a list");
        slot_seqs[k] = py::reinterpret_borrow<py::sequence>(item.second);
        if (slot_seqs[k].size() != n)
          throw ValueError(std::string("slots[") + slot_kind_name(SlotKind(k)) + "] has " +
                           std::to_string(slot_seqs[k].size()) + " entries for " + std::to_string(n) + " gradients");
        has_slots[k] = true;
      }
    }
    py::sequence fresh_seq;
    const bool has_fresh = !fresh_momentum.is_none();
    if (has_fresh) {
      fresh_seq = py::reinterpret_borrow<py::sequence>(fresh_momentum);
      if (fresh_seq.size() != n)
        throw ValueError("fresh_momentum has " + std::to_string(fresh_seq.size()) + " entries for " +
                         std::to_string(n) + " gradients");
    }
    std::fill(var_views_.begin(), var_views_.end(), TensorView{});
    std::fill(grad_views_.begin(), grad_views_.end(), TensorView{});
    for (auto& k : slot_views_) std::fill(k.begin(), k.end(), TensorView{});
    std::fill(fresh_.begin(), fresh_.end(), 0);
    std::fill(present_.begin(), present_.end(), 0);
    if (stream) {
      if (*stream < 0) throw ValueError("stream must be a cudaStream_t handle >= 0, got " + std::to_string(*stream));
      ctx.stream = *stream;
    }
    for (size_t i = 0; i < n; ++i) {
      py::handle var = all ? built_[i] : vars_seq[i];
      const size_t pos = position_of(var, i);
      if (present_[pos]) throw ValueError(where("variables", i) + " appears more than once in this call");
      present_[pos] = 1;
      for (int k = 0; k < kNumSlotKinds; ++k) {
        if (!has_slots[k]) continue;
        py::object slot = slot_seqs[k][i];
        if (slot.is_none()) continue;
        held_.push_back(slot);
        Imported si;
        import_tensor(slot, true, kSlotNames[k], i, si, ctx);
        slot_views_[k][pos] = si.view;
      }
      if (has_fresh) fresh_[pos] = py::bool_(fresh_seq[i]) ? 1 : 0;
      py::object grad = grads[i];
      if (grad.is_none()) {
        ++missing;
        continue;
      }
      held_.push_back(grad);
      held_.push_back(py::reinterpret_borrow<py::object>(var));
      Imported gi, vi;
      import_tensor(grad, false, "grads", i, gi, ctx);
      import_tensor(var, true, "variables", i, vi, ctx);
      if (!same_shape(gi, vi))
        throw ValueError(where("grads", i) + " has shape " + shape_str(gi) + " but its variable has shape " +
                         shape_str(vi));
      grad_views_[pos] = gi.view;
      var_views_[pos] = vi.view;
      if (gi.view.numel == 0) grad_views_[pos].data = vi.view.data ? vi.view.data : &present_[pos];
    }
    if (touches_all) {
      for (size_t pos = 0; pos < n_built; ++pos) {
        if (var_views_[pos].data) continue;
        if (sgd_.variable_spec(pos).numel == 0) {
          // An empty variable is not imported, but its view still carries its dtype and
          // device for the engine's checks (a default view read as float32: issue 14).
          var_views_[pos] = sgd_.variable_spec(pos);
          var_views_[pos].data = &present_[pos];
          continue;
        }
        Imported vi;
        import_tensor(built_[pos], true, "variables", pos, vi, ctx);
        var_views_[pos] = vi.view;
      }
    }
    // Which stream the step launches on, applied by the engine only once the step is
    // validated: the explicit one (ordered after the producer's current stream when the
    // exchange API names it), else the producer's current stream, else the legacy default
    // stream on which __dlpack__ was asked to order its work.
    int cuda_index = -1;
    for (size_t pos = 0; pos < n_built && cuda_index < 0; ++pos)
      if (var_views_[pos].device.kind == DeviceKind::cuda) cuda_index = var_views_[pos].device.index;
    if (cuda_index >= 0) {
      std::optional<uintptr_t> producer;
      if (ctx.cuda_api) {
        void* current = nullptr;
        if (ctx.cuda_api->current_work_stream(dlpack::kCUDA, cuda_index, &current) != 0)
          throw py::error_already_set();
        producer = reinterpret_cast<uintptr_t>(current);
      }
      if (ctx.stream >= 0) {
        r.stream = uintptr_t(ctx.stream);
        if (producer && *producer != *r.stream) r.wait_for_stream = producer;
      } else {
        r.stream = producer.value_or(0);
      }
    }
    r.variables = var_views_.data();
    r.grads = grad_views_.data();
    for (int k = 0; k < kNumSlotKinds; ++k) r.slots[k] = has_slots[k] ? slot_views_[k].data() : nullptr;
    r.fresh_momentum = has_fresh ? fresh_.data() : nullptr;
  }

  static constexpr const char* kSlotNames[kNumSlotKinds] = {"slots[momentum]", "slots[average]",
                                                            "slots[accumulator]", "slots[master]",
                                                            "slots[remainder]"};

  SGD sgd_;
  std::mutex busy_;
  std::vector<py::object> built_;
  std::vector<py::object> held_;
  std::unordered_map<PyObject*, size_t> index_;
  std::vector<TensorView> var_views_, grad_views_;
  std::vector<TensorView> slot_views_[kNumSlotKinds];
  std::vector<uint8_t> fresh_;
  std::vector<char> present_;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastsgd native core: the SGD engine behind fastsgd.SGD";
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fastsgd::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const fastsgd::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const py::cast_error& e) {
      // pybind11 would raise RuntimeError for an argument it cannot convert (an int beyond
      // int64 for a stream or a count, ...): that is a wrong argument, so a TypeError.
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  // Real Python enums (enum.Enum), so that they compare, hash, pickle and type-check as users expect.
  py::native_enum<Convention>(m, "Convention", "enum.Enum", "Which per-element rule the engine follows.")
      .value("keras", Convention::keras, "keras.optimizers.SGD: v = m*v - lr*g; w += v")
      .value("torch", Convention::torch, "torch.optim.SGD: b = m*b + (1-dampening)*g; w -= lr*b")
      .finalize();
  py::native_enum<DecayForm>(m, "DecayForm", "enum.Enum", "How weight decay enters the update.")
      .value("decoupled", DecayForm::decoupled, "w *= 1 - weight_decay * lr (Keras)")
      .value("l2", DecayForm::l2, "g += weight_decay * w (torch)")
      .finalize();
  py::native_enum<SlotKind>(m, "SlotKind", "enum.Enum", "The optimizer state kept per variable.")
      .value("momentum", SlotKind::momentum)
      .value("average", SlotKind::average)
      .value("accumulator", SlotKind::accumulator)
      .value("master", SlotKind::master)
      .value("remainder", SlotKind::remainder)
      .finalize();
  py::native_enum<MasterForm>(m, "MasterForm", "enum.Enum",
                              "Where a 16-bit variable's exact float32 value lives between steps.")
      .value("float32", MasterForm::float32, "a float32 master slot (4 bytes per element)")
      .value("remainder", MasterForm::remainder,
             "bfloat16 only: the master's low 16 bits in a remainder slot (2 bytes per element)")
      .finalize();

  // Both records are bound field by field from their own lists in sgd.h: a new
  // hyper-parameter needs no edit here.
  py::class_<Group> group(m, "Group", "One parameter group's hyper-parameters.");
  group.def(py::init([](const py::kwargs& kwargs) { return assign_fields(Group{}, kwargs, "Group"); }),
            "Group(**fields): unknown names raise TypeError.");
  Group::fields([&](const char* name, auto member, const char* doc) { group.def_readwrite(name, member, doc); });
  group.def("__repr__", [](const Group& g) { return record_repr(g, "Group"); });

  py::class_<Options> options(m, "Options", "The engine's hyper-parameters; None leaves an optional feature off.");
  options.def(py::init([](const py::kwargs& kwargs) { return assign_fields(Options{}, kwargs, "Options"); }),
              "Options(**fields): unknown names raise TypeError.");
  Options::fields([&](const char* name, auto member, const char* doc) { options.def_readwrite(name, member, doc); });
  options.def("__repr__", [](const Options& o) { return record_repr(o, "Options"); });
  m.def("validate", [](const Options& o) { validate(o); }, py::arg("options"),
        "Raises ValueError when a hyper-parameter is out of range (Keras's or torch's wording).");

  py::class_<GradStats>(m, "GradStats", "Sums of squares of the effective gradients, as norm clipping measures them.")
      .def_readonly("sum_squares", &GradStats::sum_squares, "per built variable (0.0 without a gradient)")
      .def_readonly("total", &GradStats::total, "sum over variables, in build order")
      .def_readonly("nonfinite", &GradStats::nonfinite, "whether any gradient element is Inf or NaN");

  py::class_<Engine>(m, "Engine", "The C++ fastsgd::SGD engine, holding groups, slots and iteration counters.")
      .def(py::init<const Options&>(), py::arg("options"), "Creates an engine; ValueError on a bad hyper-parameter.")
      .def("add_group", [](Engine& e, const Group& g) { return e.locked([&](SGD& s) { return s.add_group(g); }); },
           py::arg("group"), "Adds a parameter group; returns its index.")
      .def("set_group", [](Engine& e, size_t i, const Group& g) { e.locked([&](SGD& s) { s.set_group(i, g); }); },
           py::arg("index"), py::arg("group"), "Replaces group index's hyper-parameters (from the next step on).")
      .def("group", [](Engine& e, size_t i) { return e.locked([&](SGD& s) { return s.group(i); }); },
           py::arg("index"), "A copy of group index's hyper-parameters.")
      .def_property_readonly("num_groups", [](Engine& e) { return e.sgd().num_groups(); }, "Number of groups.")
      .def("build", &Engine::build, py::arg("variables"), py::arg("decays") = std::vector<bool>{},
           py::arg("groups") = std::vector<size_t>{},
           "Declares the variables in order (with their weight-decay flags and group indices) and allocates "
           "their engine-owned slots (zeros).")
      .def("step", &Engine::step, py::arg("grads"), py::arg("variables") = py::none(), py::kw_only(),
           py::arg("learning_rate") = py::none(), py::arg("slots") = py::none(),
           py::arg("fresh_momentum") = py::none(), py::arg("grad_scale") = 1.0, py::arg("found_inf") = py::none(),
           py::arg("global_sum_squares") = py::none(), py::arg("stream") = py::none(),
           "One step: updates the variables in place; returns (updated, skipped, missing). variables=None "
           "means the built list; slots={SlotKind: list} passes caller-owned slots; learning_rate replaces "
           "every group's rate for this step.")
      .def("grad_stats", &Engine::grad_stats, py::arg("grads"), py::arg("variables") = py::none(), py::kw_only(),
           py::arg("slots") = py::none(), py::arg("grad_scale") = 1.0,
           "What the next step would measure for norm clipping and the non-finite check; changes nothing.")
      .def("finalize", &Engine::finalize, py::arg("variables"),
           "Copies each EMA average into the variable at the same position.")
      .def("read_slot", &Engine::read_slot, py::arg("kind"), py::arg("index"), "A copy of one slot (flat).")
      .def("write_slot", &Engine::write_slot, py::arg("kind"), py::arg("index"), py::arg("values"),
           "Overwrites one slot from a flat contiguous array of the slot's dtype.")
      .def("slot_spec", &Engine::slot_spec, py::arg("index"), "(numel, dtype name) of variable index's slots.")
      .def("has_slot",
           [](Engine& e, SlotKind kind, std::optional<size_t> index) {
             return index ? e.sgd().slot(kind, *index).data != nullptr : e.sgd().has_slot(kind);
           },
           py::arg("kind"), py::arg("index") = py::none(),
           "Whether engine-owned slots of this kind exist (for variable index, when given).")
      .def_property("seed", [](Engine& e) { return e.sgd().seed(); },
                    [](Engine& e, uint64_t v) { e.locked([&](SGD& s) { s.set_seed(v); }); },
                    "The stochastic rounding seed (Options.seed), restored by checkpoints.")
      .def("momentum_started", [](Engine& e, size_t i) { return e.sgd().momentum_started(i); }, py::arg("index"),
           "torch convention: whether variable index's momentum slot has had its first step.")
      .def("set_momentum_started",
           [](Engine& e, size_t i, bool v) { e.locked([&](SGD& s) { s.set_momentum_started(i, v); }); },
           py::arg("index"), py::arg("started"), "Marks variable index's momentum slot as started or fresh.")
      .def("set_decays", [](Engine& e, size_t i, bool d) { e.locked([&](SGD& s) { s.set_decays(i, d); }); },
           py::arg("index"), py::arg("decays"), "Includes or excludes variable index from weight decay.")
      .def("set_stream", [](Engine& e, uintptr_t st) { e.locked([&](SGD& s) { s.set_stream(st); }); },
           py::arg("stream"), "CUDA stream (cudaStream_t as int) for the following steps.")
      .def_property_readonly("options", [](Engine& e) { return e.sgd().options(); }, "A copy of the options.")
      .def_property_readonly("built", [](Engine& e) { return e.sgd().built(); }, "Whether build() ran.")
      .def_property_readonly("size", &Engine::size, "Number of built variables.")
      .def_property_readonly("update_is_due", [](Engine& e) { return e.sgd().update_is_due(); },
                             "Whether the next step updates variables (False inside an accumulation window).")
      .def_property_readonly("iterations", [](Engine& e) { return e.sgd().iterations(); },
                             "Completed update steps (Keras's iterations).")
      .def_property("raw_iterations", [](Engine& e) { return e.sgd().raw_iterations(); },
                    [](Engine& e, int64_t v) { e.locked([&](SGD& s) { s.set_raw_iterations(v); }); },
                    "Every applied call so far (Keras's _iterations); skipped steps are not counted.")
      .def_property("skipped_steps", [](Engine& e) { return e.sgd().skipped_steps(); },
                    [](Engine& e, int64_t v) { e.locked([&](SGD& s) { s.set_skipped_steps(v); }); },
                    "Steps skipped for non-finite gradients or found_inf.");

  m.def("cpu_info", [] {
    const CpuInfo c = cpu_info();
    py::dict d;
    d["available"] = c.available;
    d["active"] = c.active;
    d["threads"] = c.threads;
    return d;
  }, "ISA levels this CPU supports, the one in use, and the thread count.");
  m.def("cuda_info", [] {
    const CudaInfo c = cuda_info();
    py::dict d;
    d["built"] = c.built;
    d["device_count"] = c.device_count;
    d["status"] = c.status;
    return d;
  }, "Whether CUDA kernels were built, and the devices found.");
  m.def("set_num_threads", [](int n) { set_num_threads(n); }, py::arg("threads"),
        "Caps the CPU threads a step uses (0 restores FASTSGD_NUM_THREADS or the CPU count).");
  m.attr("__version__") = std::to_string(FASTSGD_VERSION_MAJOR) + "." + std::to_string(FASTSGD_VERSION_MINOR) +
                          "." + std::to_string(FASTSGD_VERSION_PATCH);
}
