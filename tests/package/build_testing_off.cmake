# SPDX-License-Identifier: Apache-2.0
# Configures mixprec with BUILD_TESTING=OFF (and MIXPREC_BUILD_TESTS=ON,
# which it overrides) and checks that no test is defined: CTest's switch is
# honoured, as a distribution's packaging expects.
#   cmake -DSOURCE=<mixprec> -DWORK=<scratch folder> -DGENERATOR=<generator> -P build_testing_off.cmake
file(REMOVE_RECURSE "${WORK}")
execute_process(
  COMMAND ${CMAKE_COMMAND} -S "${SOURCE}" -B "${WORK}" -G "${GENERATOR}" -DBUILD_TESTING=OFF
          -DMIXPREC_BUILD_TESTS=ON -DMIXPREC_BUILD_EXAMPLES=OFF -DMIXPREC_ENABLE_CUDA=OFF
  RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "configure failed (${status}):\n${out}\n${err}")
endif()
if(NOT out MATCHES "mixprec: tests off: BUILD_TESTING is OFF")
  message(FATAL_ERROR "configure did not say that BUILD_TESTING turned the tests off:\n${out}")
endif()
execute_process(COMMAND ${CMAKE_CTEST_COMMAND} -N WORKING_DIRECTORY "${WORK}"
                RESULT_VARIABLE status OUTPUT_VARIABLE listing ERROR_VARIABLE err)
if(NOT listing MATCHES "Total Tests: 0")
  message(FATAL_ERROR "BUILD_TESTING=OFF, yet ctest lists tests:\n${listing}${err}")
endif()
message(STATUS "BUILD_TESTING=OFF: no tests defined")
