// The error convention of arbor's C++ shims (arbor_c10d.cpp, arbor_aten.cpp): every entry
// point runs its body in `guarded`, which turns any C++ exception into a malloc'ed message for
// the caller (freed with arbor_c10d_string_free); nothing unwinds into Rust.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace {

inline void set_error(char** error_out, const std::string& message) {
  if (error_out == nullptr) {
    return;
  }
  char* copy = static_cast<char*>(std::malloc(message.size() + 1));
  if (copy == nullptr) {
    *error_out = nullptr;
    return;
  }
  std::memcpy(copy, message.data(), message.size());
  copy[message.size()] = '\0';
  *error_out = copy;
}

// Runs `body`, turning any exception into an error message. Returns false on an exception.
template <typename Body>
inline bool guarded(char** error_out, Body&& body) {
  try {
    body();
    return true;
  } catch (const c10::Error& error) {
    set_error(error_out, error.what_without_backtrace());
  } catch (const std::exception& error) {
    set_error(error_out, error.what());
  } catch (...) {
    set_error(error_out, "unknown C++ exception");
  }
  return false;
}

}  // namespace
