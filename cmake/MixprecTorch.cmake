# SPDX-License-Identifier: Apache-2.0
# Finding libtorch for mixprec::torch (include/mixprec/torch/params.hpp), used
# by the build and by the installed package config alike.

# Looks for libtorch through its TorchConfig.cmake (Debian's libtorch-dev, a
# libtorch archive, or the one inside Python's torch package: put
# `python3 -c 'import torch; print(torch.utils.cmake_prefix_path)'` in
# CMAKE_PREFIX_PATH). Sets MIXPREC_TORCH_FOUND and MIXPREC_TORCH_VERSION in
# the caller's scope; libtorch's imported target `torch` is left in the
# caller's directory.
#
# A function, not a macro: TorchConfig.cmake and the Caffe2 config it loads
# set many variables of their own (flags, paths, the CUDA settings of a CUDA
# build), and set in a function's scope they cannot change how mixprec's own
# targets, or the caller's, are compiled. What remains is the imported
# targets (directory scope) and the cache entries those configs write (the
# libraries they found). `torch` found already (the caller ran
# find_package(Torch) itself) is used as it is.
function(mixprec_find_torch)
  if(NOT TARGET torch)
    find_package(Torch QUIET)
  endif()
  if(TARGET torch)
    set(MIXPREC_TORCH_FOUND TRUE PARENT_SCOPE)
    set(MIXPREC_TORCH_VERSION "${Torch_VERSION}" PARENT_SCOPE)
  else()
    set(MIXPREC_TORCH_FOUND FALSE PARENT_SCOPE)
    set(MIXPREC_TORCH_VERSION "" PARENT_SCOPE)
  endif()
endfunction()

# For the mixprec build: honours MIXPREC_ENABLE_TORCH (AUTO, ON, OFF) and
# sets MIXPREC_HAS_TORCH in the caller's scope.
macro(mixprec_enable_torch)
  set(MIXPREC_HAS_TORCH OFF)
  string(TOUPPER "${MIXPREC_ENABLE_TORCH}" _mixprec_torch_mode)
  if(NOT _mixprec_torch_mode MATCHES "^(AUTO|ON|OFF)$")
    message(FATAL_ERROR "MIXPREC_ENABLE_TORCH = '${MIXPREC_ENABLE_TORCH}', must be AUTO, ON or OFF")
  endif()
  if(NOT _mixprec_torch_mode STREQUAL "OFF")
    mixprec_find_torch()
    if(MIXPREC_TORCH_FOUND)
      set(MIXPREC_HAS_TORCH ON)
    elseif(_mixprec_torch_mode STREQUAL "ON")
      message(FATAL_ERROR "MIXPREC_ENABLE_TORCH=ON but libtorch (TorchConfig.cmake) was not found; "
                          "install libtorch-dev, or add libtorch's prefix to CMAKE_PREFIX_PATH "
                          "(for Python's torch: python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')")
    endif()
  endif()
  message(STATUS "mixprec: libtorch ${MIXPREC_HAS_TORCH} ${MIXPREC_TORCH_VERSION} (MIXPREC_ENABLE_TORCH=${_mixprec_torch_mode})")
endmacro()
