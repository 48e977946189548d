# SPDX-License-Identifier: Apache-2.0
# An example trained straight through against the same run stopped at
# --stop-at-step and resumed with --resume: the final checkpoints must be
# the same bytes (SHARDED: the ranks' files carry a random id, so the last
# epoch lines are compared instead: loss, scale, skips, test accuracy).
# The resumed run also writes --report, which must exist.
#
#   cmake -DPROGRAM=exe -DDIR=work_dir -DARGS="--device cpu ..." -DSTOP=N -DEVERY=K
#         [-DLAUNCH="mpiexec -n 2 ..."] [-DSHARDED=ON] -P resume_test.cmake
foreach(v PROGRAM DIR ARGS STOP EVERY)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "resume_test.cmake: -D${v}=... is missing")
  endif()
endforeach()
separate_arguments(args UNIX_COMMAND "${ARGS}")
set(launch "")
if(DEFINED LAUNCH AND NOT LAUNCH STREQUAL "")
  separate_arguments(launch UNIX_COMMAND "${LAUNCH}")
endif()
file(REMOVE_RECURSE "${DIR}")
file(MAKE_DIRECTORY "${DIR}")

function(run name out)
  execute_process(COMMAND ${launch} "${PROGRAM}" ${args} ${ARGN} WORKING_DIRECTORY "${DIR}"
                  OUTPUT_VARIABLE stdout ERROR_VARIABLE stderr RESULT_VARIABLE rc)
  message("--- ${name}: ${PROGRAM} ${args} ${ARGN}\n${stdout}${stderr}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${name}: exit code ${rc}")
  endif()
  set(${out} "${stdout}" PARENT_SCOPE)
endfunction()

# The last "epoch N  loss ..." line without its images/s (a time).
function(last_epoch_line text out)
  string(REGEX MATCHALL "epoch +[0-9]+  loss [^\n]*" lines "${text}")
  list(LENGTH lines n)
  if(n EQUAL 0)
    message(FATAL_ERROR "no epoch line in:\n${text}")
  endif()
  list(GET lines -1 line)
  string(REGEX REPLACE " +[0-9.]+ images/s" " images/s" line "${line}")  # a time, printed %8.0f
  set(${out} "${line}" PARENT_SCOPE)
endfunction()

run(straight straight_out --checkpoint straight.safetensors)
run(stopped stopped_out --checkpoint split.safetensors --stop-at-step ${STOP})
if(NOT stopped_out MATCHES "stopped after step ${STOP} ")
  message(FATAL_ERROR "the stopped run did not say where it stopped")
endif()
run(resumed resumed_out --resume split.safetensors --checkpoint split.safetensors --checkpoint-every ${EVERY}
    --report run.html)
if(NOT resumed_out MATCHES "resumed from split.safetensors")
  message(FATAL_ERROR "the resumed run did not say where it resumed")
endif()

last_epoch_line("${straight_out}" straight_line)
last_epoch_line("${resumed_out}" resumed_line)
if(NOT straight_line STREQUAL resumed_line)
  message(FATAL_ERROR "straight:  ${straight_line}\nresumed:   ${resumed_line}")
endif()
message("same last epoch: ${resumed_line}")
if(NOT SHARDED)
  execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files "${DIR}/straight.safetensors" "${DIR}/split.safetensors"
                  RESULT_VARIABLE differ)
  if(NOT differ EQUAL 0)
    message(FATAL_ERROR "the final checkpoints differ: ${DIR}/straight.safetensors, ${DIR}/split.safetensors")
  endif()
  file(SIZE "${DIR}/straight.safetensors" bytes)
  message("same final checkpoint: ${bytes} bytes")
endif()
if(NOT EXISTS "${DIR}/run.html" OR NOT EXISTS "${DIR}/run.jsonl")
  message(FATAL_ERROR "--report run.html: no run.html and run.jsonl in ${DIR}")
endif()
file(READ "${DIR}/run.html" page LIMIT 200)
if(NOT page MATCHES "<!DOCTYPE html>")
  message(FATAL_ERROR "run.html is not an HTML page: ${page}")
endif()
