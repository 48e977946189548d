# SPDX-License-Identifier: Apache-2.0
# cmake -DA=prog -DB=prog -DEXPECT=same|different -P compare_bits.cmake
execute_process(COMMAND ${A} OUTPUT_VARIABLE a RESULT_VARIABLE ra)
execute_process(COMMAND ${B} OUTPUT_VARIABLE b RESULT_VARIABLE rb)
if(NOT ra EQUAL 0 OR NOT rb EQUAL 0)
  message(FATAL_ERROR "failed to run: ${A} -> ${ra}, ${B} -> ${rb}")
endif()
message(STATUS "${A}: ${a}")
message(STATUS "${B}: ${b}")
if(EXPECT STREQUAL "same" AND NOT a STREQUAL b)
  message(FATAL_ERROR "the two builds give different bits")
elseif(EXPECT STREQUAL "different")
  if(b MATCHES "no FMA")
    message(STATUS "no FMA: -march=native cannot contract here; nothing to catch")
  elseif(a STREQUAL b)
    message(FATAL_ERROR "with the barrier off, the contracting build still gives the same bits: "
                        "the comparison would not see a contraction")
  endif()
endif()
