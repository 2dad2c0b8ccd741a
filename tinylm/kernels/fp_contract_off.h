// Every float operation rounded on its own, on every path: GCC otherwise fuses a * b + c into one FMA in some
// places and not others, and a kernel's vector and scalar paths (or two blockings of one product) would differ in
// the last bit. Fused multiply-adds a kernel wants are written as such (_mm512_fmadd_ps, std::fma).
// Include after the system headers, before the kernel's own code: the pragma applies to what follows it.

#pragma once

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
