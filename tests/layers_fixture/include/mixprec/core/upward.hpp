// A planted violation for header_layers_catches_a_violation: core/ includes
// a header of amp/, a layer above it. Never compiled.
#pragma once
#include "mixprec/amp/above.hpp"
