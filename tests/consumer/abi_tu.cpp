// SPDX-License-Identifier: Apache-2.0
// One translation unit of the ABI-namespace test, compiled twice: with
// MIXPREC_WITH_CUDA=0 (as abi_host) and =1 (as abi_cuda). It reports what
// detail::require_usable, an inline function whose body depends on the
// macro, says of cuda:0. Built at -O0 so that the call is a real call to the
// inline function's one out-of-line copy, which the linker would merge with
// the other unit's if the two had the same mangled name.
#include <string>

#include "mixprec/core/device.hpp"

extern "C" const char* ABI_TU_NAME() {
  static std::string message;
  try {
    mixprec::detail::require_usable(mixprec::Device::cuda(0), "require_usable");
    message = "usable";
  } catch (const mixprec::Error& e) {
    message = e.what();
  }
  return message.c_str();
}
