// SPDX-License-Identifier: Apache-2.0
// Reproducer of a wrong-code bug of GCC 12.2 (Debian 12) with AVX-512 enabled: the constant
// {8, 8, 0, 0} below is emitted as a vpbroadcastq of one 8-byte constant 8, so it reads
// {8, 8, 8, 8}. Compiled (-S, never run) by cmake/gcc_avx512_bug.cmake at configure time; run
// on an AVX-512 CPU it prints "8 8 8 8 eq=0" when miscompiled, "8 8 0 0 eq=1" otherwise.
#include <cstdint>
#include <cstdio>
#include <vector>

__attribute__((noinline)) std::vector<int64_t> f(int n) {
  std::vector<int64_t> v(4, 0);
  v[0] = n;
  v[1] = n;
  return v;
}

int main() {
  auto st = f(8);
  std::vector<int64_t> e{8, 8, 0, 0};
  for (auto x : e) printf("%ld ", static_cast<long>(x));
  printf("eq=%d\n", st == e);
}
