# SPDX-License-Identifier: Apache-2.0
# A consumer without CMake: compiles and runs tests/package/consumer.cpp with
# the flags `pkg-config --cflags mixprec` gives for an installed mixprec.
#   cmake -DPREFIX=<install prefix> -DCXX=<compiler> -DVERSION=<x.y.z>
#         -DWORK=<scratch folder> -P pkg_config.cmake
# The environment's CXXFLAGS and LDFLAGS are added (the sanitizer leg sets them).
foreach(var PREFIX CXX VERSION WORK)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "pkg_config.cmake: pass -D${var}=...")
  endif()
endforeach()
find_program(PKG_CONFIG pkg-config)
if(NOT PKG_CONFIG)
  message(FATAL_ERROR "pkg-config is not installed (Debian package pkg-config; scripts/test.sh installs it)")
endif()
# The installed file first, then the system's (Eigen's and nlohmann-json's).
set(ENV{PKG_CONFIG_PATH} "${PREFIX}/share/pkgconfig:$ENV{PKG_CONFIG_PATH}")

function(run out)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE text ERROR_VARIABLE err
                  OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT status EQUAL 0)
    string(REPLACE ";" " " command "${ARGN}")
    message(FATAL_ERROR "${command}: exit status ${status}\n${text}\n${err}")
  endif()
  set(${out} "${text}" PARENT_SCOPE)
endfunction()

run(version ${PKG_CONFIG} --modversion mixprec)
if(NOT version STREQUAL VERSION)
  message(FATAL_ERROR "pkg-config --modversion mixprec: ${version}, expected ${VERSION}")
endif()
run(cflags ${PKG_CONFIG} --cflags mixprec)
message(STATUS "pkg-config --cflags mixprec: ${cflags}")
# The include path and nothing else: mixprec sets none of a consumer's
# compile options (issue 20; it carried -ffp-contract=off -Wno-psabi).
if(cflags MATCHES "(^| )-[fWmO]")
  message(FATAL_ERROR "pkg-config --cflags mixprec imposes a compile option: ${cflags}")
endif()
string(REGEX MATCH "-I([^ ]+)" ignored "${cflags}")
get_filename_component(include_dir "${CMAKE_MATCH_1}" REALPATH)
get_filename_component(want "${PREFIX}/include" REALPATH)
if(NOT include_dir STREQUAL want)
  message(FATAL_ERROR "pkg-config --cflags mixprec: -I names ${include_dir}, not the installed ${want}: ${cflags}")
endif()
separate_arguments(cflags UNIX_COMMAND "${cflags} $ENV{CXXFLAGS}")
separate_arguments(ldflags UNIX_COMMAND "$ENV{LDFLAGS}")
file(MAKE_DIRECTORY "${WORK}")
get_filename_component(here "${CMAKE_CURRENT_LIST_FILE}" DIRECTORY)
run(ignored ${CXX} -std=c++17 -O1 ${cflags} "${here}/consumer.cpp" -o "${WORK}/consumer" ${ldflags})
run(said "${WORK}/consumer")
message(STATUS "${said}")
