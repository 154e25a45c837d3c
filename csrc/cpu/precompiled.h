// The headers every translation unit here includes, parsed once per build: setup.py compiles this file into a
// GCC precompiled header and gives it to each .cpp with -include (their own #includes of these headers then
// cost nothing). ATen/ATen.h alone is ~8 s of parsing per file, most of a file's compile at -O0; it is the
// same code either way. The sources still include what they use.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>
