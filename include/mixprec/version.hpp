// SPDX-License-Identifier: Apache-2.0
// mixprec's version, the one place it is written: CMake's project() reads it
// from this file (CMakeLists.txt), and the package files (mixprecConfigVersion.cmake,
// mixprec.pc) take it from there.
#pragma once

#define MIXPREC_VERSION_MAJOR 0
#define MIXPREC_VERSION_MINOR 1
#define MIXPREC_VERSION_PATCH 0
/// "MAJOR.MINOR.PATCH", the three numbers above.
#define MIXPREC_VERSION_STRING "0.1.0"
