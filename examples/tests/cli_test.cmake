# SPDX-License-Identifier: Apache-2.0
# The flags of an example program or monitor_report, through CLI11:
# --help lists every flag with its default and exits 0; usage errors exit 2
# and name the allowed choices or range; --flag=value and --flag value both
# parse. CASES is a list of cases separated by "|", each
#   "RC;REGEX;arg;arg;..."  (RC: the exit code; REGEX: must match stdout + stderr)
# written with "," for ";" in the arguments of add_test.
#
#   cmake -DPROGRAM=exe -DDIR=work_dir -DCASES="0,--help,...|2,..." -P cli_test.cmake
foreach(v PROGRAM DIR CASES)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "cli_test.cmake: -D${v}=... is missing")
  endif()
endforeach()
if(NOT EXISTS "${PROGRAM}")
  message("${PROGRAM} is not built: skipped")  # a build of some targets only
  return()
endif()
file(MAKE_DIRECTORY "${DIR}")
string(REPLACE "|" ";" cases "${CASES}")
set(failed 0)
foreach(case IN LISTS cases)
  string(REPLACE "," ";" fields "${case}")
  list(POP_FRONT fields want_rc want_output)
  execute_process(COMMAND "${PROGRAM}" ${fields} WORKING_DIRECTORY "${DIR}"
                  OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
  string(REPLACE ";" " " shown "${fields}")
  if(NOT rc STREQUAL want_rc OR NOT "${out}${err}" MATCHES "${want_output}")
    message("FAILED: ${PROGRAM} ${shown}: exit code ${rc} (want ${want_rc}), output must match '${want_output}':\n"
            "${out}${err}")
    math(EXPR failed "${failed} + 1")
  else()
    message("ok: ${shown} -> ${rc}")
  endif()
endforeach()
if(failed GREATER 0)
  message(FATAL_ERROR "${failed} case(s) failed")
endif()
