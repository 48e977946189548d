# SPDX-License-Identifier: Apache-2.0
# Finding CUDA for mixprec, used by the build and by the installed package
# config alike: nvcc (for building), the toolkit's libraries, cuDNN (optional),
# and the nvcc flags that Eigen needs.

# Adds to `target` the nvcc options Eigen 3.4 needs: its constexpr functions
# are called from device code (--expt-relaxed-constexpr), and its host-only
# functions called from __host__ __device__ ones warn by the thousand
# (diagnostics 20012, 20013, 20015), harmlessly: those paths never run on the
# device.
function(mixprec_add_nvcc_flags target)
  target_compile_options(${target} INTERFACE
    "$<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr;--diag-suppress=20012,20013,20015>")
endfunction()

# Finds `header` and library `lib` in ${ROOT} (e.g. CUDNN_ROOT) or the CUDA
# toolkit's folders, and defines the imported target `target`; sets
# MIXPREC_<NAME>_FOUND in the caller's scope. NAME is `lib` in upper case.
function(mixprec_find_toolkit_library target header lib root)
  string(TOUPPER "${lib}" name)
  if(TARGET ${target})
    set(MIXPREC_${name}_FOUND TRUE PARENT_SCOPE)
    return()
  endif()
  find_path(MIXPREC_${name}_INCLUDE_DIR ${header}
    HINTS ${${root}} ${CUDAToolkit_INCLUDE_DIRS} PATH_SUFFIXES include)
  find_library(MIXPREC_${name}_LIBRARY ${lib}
    HINTS ${${root}} ${CUDAToolkit_LIBRARY_DIR} PATH_SUFFIXES lib64 lib)
  if(NOT MIXPREC_${name}_INCLUDE_DIR OR NOT MIXPREC_${name}_LIBRARY)
    set(MIXPREC_${name}_FOUND FALSE PARENT_SCOPE)
    return()
  endif()
  add_library(${target} UNKNOWN IMPORTED GLOBAL)
  set_target_properties(${target} PROPERTIES
    IMPORTED_LOCATION "${MIXPREC_${name}_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${MIXPREC_${name}_INCLUDE_DIR}")
  set(MIXPREC_${name}_FOUND TRUE PARENT_SCOPE)
endfunction()

# cuDNN (or CUDNN_ROOT): mixprec::cudnn, MIXPREC_CUDNN_FOUND.
macro(mixprec_find_cudnn)
  mixprec_find_toolkit_library(mixprec::cudnn cudnn.h cudnn CUDNN_ROOT)
endmacro()

# NCCL (or NCCL_ROOT): mixprec::nccl_library, MIXPREC_NCCL_FOUND.
macro(mixprec_find_nccl)
  mixprec_find_toolkit_library(mixprec::nccl_library nccl.h nccl NCCL_ROOT)
endmacro()

# For the mixprec build: honours MIXPREC_ENABLE_CUDA (AUTO, ON, OFF) and
# MIXPREC_ENABLE_CUDNN (AUTO, ON, OFF), enables the CUDA language and sets
# MIXPREC_HAS_CUDA and MIXPREC_HAS_CUDNN in the caller's scope. AUTO builds
# CUDA when nvcc and the toolkit's runtime, cuBLAS and cuBLASLt are found,
# and says why not otherwise; cuDNN is optional (without it the layers'
# Conv2d and MaxPool2d refuse to run on a GPU, naming what is missing).
macro(mixprec_enable_cuda)
  set(MIXPREC_HAS_CUDA OFF)
  set(MIXPREC_HAS_CUDNN OFF)
  string(TOUPPER "${MIXPREC_ENABLE_CUDA}" _mixprec_cuda_mode)
  string(TOUPPER "${MIXPREC_ENABLE_CUDNN}" _mixprec_cudnn_mode)
  if(NOT _mixprec_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
    message(FATAL_ERROR "MIXPREC_ENABLE_CUDA = '${MIXPREC_ENABLE_CUDA}', must be AUTO, ON or OFF")
  endif()
  if(NOT _mixprec_cudnn_mode MATCHES "^(AUTO|ON|OFF)$")
    message(FATAL_ERROR "MIXPREC_ENABLE_CUDNN = '${MIXPREC_ENABLE_CUDNN}', must be AUTO, ON or OFF")
  endif()
  set(_mixprec_cuda_why "")
  if(NOT _mixprec_cuda_mode STREQUAL "OFF")
    include(CheckLanguage)
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      # sm_90 machine code for the H100 plus compute_90 PTX for newer GPUs.
      if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
        set(CMAKE_CUDA_ARCHITECTURES 90)
      endif()
      enable_language(CUDA)
      set(CMAKE_CUDA_STANDARD 17)
      set(CMAKE_CUDA_STANDARD_REQUIRED ON)
      find_package(CUDAToolkit)
      set(_mixprec_cuda_missing "")
      foreach(_lib cudart cublas cublasLt)
        if(NOT TARGET CUDA::${_lib})
          list(APPEND _mixprec_cuda_missing ${_lib})
        endif()
      endforeach()
      if(_mixprec_cuda_missing)
        string(REPLACE ";" ", " _mixprec_cuda_missing "${_mixprec_cuda_missing}")
        set(_mixprec_cuda_why "nvcc found, but not the toolkit's ${_mixprec_cuda_missing}")
      else()
        set(MIXPREC_HAS_CUDA ON)
      endif()
    else()
      set(_mixprec_cuda_why "no CUDA compiler found (set CUDACXX)")
    endif()
    if(NOT MIXPREC_HAS_CUDA)
      if(_mixprec_cuda_mode STREQUAL "ON")
        message(FATAL_ERROR "MIXPREC_ENABLE_CUDA=ON but ${_mixprec_cuda_why}")
      endif()
      message(STATUS "mixprec: building without CUDA: ${_mixprec_cuda_why}")
    endif()
  endif()
  if(MIXPREC_HAS_CUDA AND NOT _mixprec_cudnn_mode STREQUAL "OFF")
    mixprec_find_cudnn()
    if(MIXPREC_CUDNN_FOUND)
      set(MIXPREC_HAS_CUDNN ON)
    elseif(_mixprec_cudnn_mode STREQUAL "ON")
      message(FATAL_ERROR "MIXPREC_ENABLE_CUDNN=ON but cuDNN (cudnn.h, libcudnn) was not found; set CUDNN_ROOT")
    else()
      message(STATUS "mixprec: cuDNN not found (set CUDNN_ROOT): Conv2d and MaxPool2d will refuse to run on a GPU")
    endif()
  endif()
  message(STATUS "mixprec: CUDA ${MIXPREC_HAS_CUDA} (MIXPREC_ENABLE_CUDA=${_mixprec_cuda_mode}), "
                 "cuDNN ${MIXPREC_HAS_CUDNN} (MIXPREC_ENABLE_CUDNN=${_mixprec_cudnn_mode})")
endmacro()
