// Part of the planted violation (tests/layers_fixture/). Never compiled.
#pragma once
