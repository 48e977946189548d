# SPDX-License-Identifier: Apache-2.0
# cmake -DNM=nm -DHOST=obj -DCUDA=obj -P check_abi_names.cmake: the two
# objects define require_usable under different ABI namespaces.
foreach(which HOST CUDA)
  execute_process(COMMAND ${NM} -C ${${which}} OUTPUT_VARIABLE syms RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${NM} -C ${${which}} failed")
  endif()
  string(REGEX MATCH "[^\n]*mixprec::[a-z0-9_]+::detail::require_usable[^\n]*" line "${syms}")
  message(STATUS "${which}: ${line}")
  set(${which}_LINE "${line}")
endforeach()
if(NOT HOST_LINE MATCHES "mixprec::cuda0_cudnn0::detail::require_usable")
  message(FATAL_ERROR "the MIXPREC_WITH_CUDA=0 object lacks mixprec::cuda0_cudnn0::detail::require_usable")
endif()
if(NOT CUDA_LINE MATCHES "mixprec::cuda1_cudnn0::detail::require_usable")
  message(FATAL_ERROR "the MIXPREC_WITH_CUDA=1 object lacks mixprec::cuda1_cudnn0::detail::require_usable")
endif()
