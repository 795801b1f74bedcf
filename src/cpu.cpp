// SPDX-License-Identifier: Apache-2.0
// CPU features from CPUID and XCR0, and the AMX permission request (moekit/cpu.hpp).
#include "moekit/cpu.hpp"

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define MOEKIT_X86 1
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace moekit {
namespace {

#if defined(MOEKIT_X86)
struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned sub = 0) noexcept {
  Regs r;
  if (static_cast<unsigned>(__get_cpuid_max(leaf & 0x80000000u, nullptr)) < leaf) return r;
  __cpuid_count(leaf, sub, r.a, r.b, r.c, r.d);
  return r;
}

bool bit(unsigned v, int i) noexcept { return ((v >> i) & 1u) != 0; }

// XCR0: the register state the OS saves (only with OSXSAVE; no -mxsave needed for the asm).
uint64_t xcr0() noexcept {
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

std::string trim(std::string s) {
  const auto b = s.find_first_not_of(' ');
  const auto e = s.find_last_not_of(' ');
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

CpuFeatures read_features() {
  CpuFeatures f;
  const Regs v = cpuid(0);
  char vendor[13] = {};
  std::memcpy(vendor, &v.b, 4);
  std::memcpy(vendor + 4, &v.d, 4);
  std::memcpy(vendor + 8, &v.c, 4);
  f.vendor = vendor;
  if (cpuid(0x80000000u).a >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      const Regs r = cpuid(0x80000002u + i);
      std::memcpy(brand + 16 * i, &r.a, 4);
      std::memcpy(brand + 16 * i + 4, &r.b, 4);
      std::memcpy(brand + 16 * i + 8, &r.c, 4);
      std::memcpy(brand + 16 * i + 12, &r.d, 4);
    }
    f.brand = trim(brand);
  }
  const Regs l1 = cpuid(1), l7 = cpuid(7, 0), l71 = cpuid(7, 1);
  const bool osxsave = bit(l1.c, 27);
  const uint64_t x = osxsave ? xcr0() : 0;
  f.os_avx = (x & 0x6u) == 0x6u;                       // SSE + AVX state
  f.os_avx512 = f.os_avx && (x & 0xE0u) == 0xE0u;      // opmask, ZMM_Hi256, Hi16_ZMM
  f.os_amx = (x & 0x60000u) == 0x60000u;               // XTILECFG, XTILEDATA
  f.sse4_2 = bit(l1.c, 20);
  f.avx = f.os_avx && bit(l1.c, 28);
  f.fma = f.avx && bit(l1.c, 12);
  f.f16c = f.avx && bit(l1.c, 29);
  f.avx2 = f.avx && bit(l7.b, 5);
  f.avx_vnni = f.avx && bit(l71.a, 4);
  f.avx512f = f.os_avx512 && bit(l7.b, 16);
  f.avx512dq = f.avx512f && bit(l7.b, 17);
  f.avx512bw = f.avx512f && bit(l7.b, 30);
  f.avx512vl = f.avx512f && bit(l7.b, 31);
  f.avx512_vnni = f.avx512f && bit(l7.c, 11);
  f.avx512_fp16 = f.avx512f && bit(l7.d, 23);
  f.avx512_bf16 = f.avx512f && bit(l71.a, 5);
  f.cpu_amx_bf16 = bit(l7.d, 22);
  f.cpu_amx_tile = bit(l7.d, 24);
  f.cpu_amx_int8 = bit(l7.d, 25);
  f.amx_tile = f.os_amx && f.cpu_amx_tile;
  f.amx_bf16 = f.amx_tile && f.cpu_amx_bf16;
  f.amx_int8 = f.amx_tile && f.cpu_amx_int8;
  return f;
}
#else
CpuFeatures read_features() { return {}; }
#endif

}  // namespace

const CpuFeatures& cpu_features() noexcept {
  static const CpuFeatures f = read_features();
  return f;
}

AmxPermission request_amx_permission() noexcept {
  static const AmxPermission p = [] {
    if (!cpu_features().amx_tile) return AmxPermission::unsupported;
#if defined(__linux__) && defined(MOEKIT_X86)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0
               ? AmxPermission::granted
               : AmxPermission::denied;
#else
    return AmxPermission::denied;
#endif
  }();
  return p;
}

const char* to_string(AmxPermission p) noexcept {
  switch (p) {
    case AmxPermission::granted:
      return "granted";
    case AmxPermission::denied:
      return "denied";
    case AmxPermission::unsupported:
      return "unsupported";
  }
  return "?";
}

}  // namespace moekit
