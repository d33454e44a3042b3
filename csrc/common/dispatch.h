// Dispatch over the op contract's dtypes only (float32, float16, bfloat16): the checks reject the rest,
// so no kernel is instantiated for them.
#pragma once

#include <ATen/Dispatch.h>

#define FEDLORA_DISPATCH_FLOATING(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)      \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
