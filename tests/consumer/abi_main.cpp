// SPDX-License-Identifier: Apache-2.0
// Links a MIXPREC_WITH_CUDA=0 unit and a =1 unit into one program: each must
// keep its own body of the same inline function (the ABI namespace gives them
// different names), so each says what its own build says of cuda:0.
#include <cstdio>
#include <cstring>

extern "C" const char* abi_host();
extern "C" const char* abi_cuda();

int main() {
  const char* host = abi_host();
  const char* cuda = abi_cuda();
  std::printf("MIXPREC_WITH_CUDA=0 unit: %s\nMIXPREC_WITH_CUDA=1 unit: %s\n", host, cuda);
  const bool host_ok = std::strstr(host, "built without CUDA") != nullptr;
  const bool cuda_ok = std::strstr(cuda, "CUDA device(s) are usable") != nullptr || std::strcmp(cuda, "usable") == 0;
  if (!host_ok || !cuda_ok) {
    std::printf("FAIL: a unit ran the other build's body of require_usable\n");
    return 1;
  }
  return 0;
}
