// A tiny test harness for the native tests: CHECK macros that count failures and print the
// first few, and finish() for the exit status CTest reads. No external framework.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <type_traits>

namespace check {

inline int& failures() {
  static int n = 0;
  return n;
}
inline int& checks() {
  static int n = 0;
  return n;
}

// Records a failure; prints the first 40 of them.
inline bool fail_at(const char* file, int line, const std::string& what) {
  if (++failures() <= 40) std::printf("FAIL %s:%d: %s\n", file, line, what.c_str());
  if (failures() == 40) std::printf("(further failures not printed)\n");
  std::fflush(stdout);
  return false;
}

template <class... A>
std::string format(const char* fmt, A... args) {
  char buf[1024];
  std::snprintf(buf, sizeof buf, fmt, args...);
  return buf;
}
inline std::string format(const char* fmt) { return fmt; }

inline uint64_t bits_of(double v) {
  uint64_t u;
  std::memcpy(&u, &v, 8);
  return u;
}
inline uint32_t bits_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
template <class T, class = typename std::enable_if<std::is_integral<T>::value>::type>
inline uint64_t bits_of(T v) {
  return uint64_t(v);
}

// Exit status for main(): 0 when every check passed.
inline int finish(const char* name) {
  if (failures() == 0) {
    std::printf("%s: all %d checks passed\n", name, checks());
    return 0;
  }
  std::printf("%s: %d of %d checks FAILED\n", name, failures(), checks());
  return 1;
}

// Exit status CTest treats as "skipped" (SKIP_RETURN_CODE).
constexpr int kSkip = 77;

}  // namespace check

// CHECK(cond) / CHECK_MSG(cond, printf-format, args...): evaluates to the condition's value.
#define CHECK(cond) \
  (++::check::checks(), (cond) ? true : ::check::fail_at(__FILE__, __LINE__, "CHECK(" #cond ")"))
#define CHECK_MSG(cond, ...)                                                                       \
  (++::check::checks(),                                                                            \
   (cond) ? true                                                                                   \
          : ::check::fail_at(__FILE__, __LINE__, "CHECK(" #cond "): " + ::check::format(__VA_ARGS__)))

// Same value bits (distinguishes -0.0 from 0.0 and NaN payloads).
#define CHECK_BITS(actual, expected)                                                              \
  do {                                                                                             \
    const auto check_a_ = (actual);                                                                \
    const auto check_e_ = (expected);                                                              \
    ++::check::checks();                                                                           \
    if (::check::bits_of(check_a_) != ::check::bits_of(check_e_))                                  \
      ::check::fail_at(__FILE__, __LINE__,                                                         \
                       ::check::format("%s = %.17g, expected %s = %.17g", #actual,                 \
                                       double(check_a_), #expected, double(check_e_)));            \
  } while (0)

#define CHECK_NEAR(actual, expected, tol)                                                          \
  do {                                                                                             \
    const double check_a_ = double(actual);                                                        \
    const double check_e_ = double(expected);                                                      \
    ++::check::checks();                                                                           \
    if (!(std::fabs(check_a_ - check_e_) <= (tol)))                                                \
      ::check::fail_at(__FILE__, __LINE__,                                                         \
                       ::check::format("%s = %.17g, expected %.17g within %g", #actual, check_a_,  \
                                       check_e_, double(tol)));                                    \
  } while (0)

#define CHECK_NAN(actual)                                                                          \
  do {                                                                                             \
    const double check_a_ = double(actual);                                                        \
    ++::check::checks();                                                                           \
    if (!std::isnan(check_a_))                                                                     \
      ::check::fail_at(__FILE__, __LINE__, ::check::format("%s = %.17g, expected NaN", #actual,    \
                                                           check_a_));                             \
  } while (0)

// CHECK_THROWS(ExceptionType, statement): the statement must throw exactly that type (or a
// subclass); any other outcome is a failure.
#define CHECK_THROWS(Exc, stmt)                                                                    \
  do {                                                                                             \
    ++::check::checks();                                                                           \
    bool check_thrown_ = false;                                                                    \
    try {                                                                                          \
      stmt;                                                                                        \
    } catch (const Exc&) {                                                                         \
      check_thrown_ = true;                                                                        \
    } catch (const std::exception& check_e_) {                                                     \
      ::check::fail_at(__FILE__, __LINE__,                                                         \
                       std::string(#stmt " threw another exception: ") + check_e_.what());         \
      check_thrown_ = true;                                                                        \
    }                                                                                              \
    if (!check_thrown_) ::check::fail_at(__FILE__, __LINE__, #stmt " did not throw " #Exc);        \
  } while (0)

// CHECK_THROWS_WITH(ExceptionType, text, statement): as CHECK_THROWS, and the message
// contains `text`.
#define CHECK_THROWS_WITH(Exc, text, stmt)                                                         \
  do {                                                                                             \
    ++::check::checks();                                                                           \
    bool check_thrown_ = false;                                                                    \
    try {                                                                                          \
      stmt;                                                                                        \
    } catch (const Exc& check_e_) {                                                                \
      check_thrown_ = true;                                                                        \
      if (std::string(check_e_.what()).find(text) == std::string::npos)                            \
        ::check::fail_at(__FILE__, __LINE__,                                                       \
                         std::string(#stmt " threw \"") + check_e_.what() + "\", expected \"" +     \
                             (text) + "\" in it");                                                \
    } catch (const std::exception& check_e_) {                                                     \
      ::check::fail_at(__FILE__, __LINE__,                                                         \
                       std::string(#stmt " threw another exception: ") + check_e_.what());         \
      check_thrown_ = true;                                                                        \
    }                                                                                              \
    if (!check_thrown_) ::check::fail_at(__FILE__, __LINE__, #stmt " did not throw " #Exc);        \
  } while (0)

#define CHECK_NOTHROW(stmt)                                                                        \
  do {                                                                                             \
    ++::check::checks();                                                                           \
    try {                                                                                          \
      stmt;                                                                                        \
    } catch (const std::exception& check_e_) {                                                     \
      ::check::fail_at(__FILE__, __LINE__, std::string(#stmt " threw: ") + check_e_.what());       \
    }                                                                                              \
  } while (0)
