// SPDX-License-Identifier: Apache-2.0
// What this CPU and its operating system support, read from CPUID and XCR0 (x86-64; all false
// elsewhere). The kernel table (kernels/packed_gemm.hpp) chooses from these; `moekit info`
// prints them.
#pragma once

#include <string>

#pragma GCC visibility push(default)  // the public API (moekit builds with hidden visibility)
namespace moekit {

/// Instruction-set extensions usable by this process: the CPU reports them (CPUID) and the OS
/// saves their register state (XCR0 via XGETBV), except AMX, whose tile state the process must
/// also request from Linux (see request_amx_permission()).
struct CpuFeatures {
  bool sse4_2 = false, avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false;
  bool avx512_bf16 = false, avx512_fp16 = false, avx512_vnni = false, avx_vnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  /// XCR0: the OS saves the AVX (YMM), AVX-512 (opmask, ZMM) and AMX (XTILECFG, XTILEDATA)
  /// state. An extension above counts as present only when its state is enabled here.
  bool os_avx = false, os_avx512 = false, os_amx = false;
  /// What the CPU reports, before the OS checks (AMX bits as CPUID gives them).
  bool cpu_amx_tile = false, cpu_amx_bf16 = false, cpu_amx_int8 = false;
  std::string vendor;  ///< CPUID vendor string, e.g. "GenuineIntel", "AuthenticAMD"
  std::string brand;   ///< CPUID brand string, e.g. "AMD EPYC 9R45 ..." (trimmed)
};

/// This CPU's features (read once).
const CpuFeatures& cpu_features() noexcept;

/// Outcome of asking Linux for the AMX tile-data state (arch_prctl ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA), which a process needs before its first tile instruction.
enum class AmxPermission {
  granted,      ///< the process may use AMX tiles
  denied,       ///< the kernel refused (or does not know the request: Linux < 5.16)
  unsupported,  ///< the CPU or the OS (XCR0) has no AMX: nothing was asked
};

/// Asks once per process (later calls return the first answer). Safe to call from any thread.
AmxPermission request_amx_permission() noexcept;

/// "granted", "denied", "unsupported".
const char* to_string(AmxPermission p) noexcept;

}  // namespace moekit
#pragma GCC visibility pop
