# SPDX-License-Identifier: Apache-2.0
# Configure-time check for a wrong-code bug of Debian 12's GCC 12.2 with AVX-512 enabled
# (docs/architecture.md, "Known compiler issues"): compiles cmake/gcc_avx512_bug.cpp to
# assembly with the given flags (no AVX-512 CPU needed) and looks for the bad instruction: a
# vpbroadcastq into a 256- or 512-bit register, from the constant pool (-mavx512f) or from a
# general register (with -mavx512vl). The reproducer has no uniform vector of four or more
# 64-bit values, so correct code never emits one. When found, it tries the candidate mitigations, narrowest
# first, and returns the first that removes the bad code; configure says so in one line.
#
#   moekit_gcc_avx512_bug_mitigation(<flags> <out-var>)
#     <flags>    the ISA flags of the units in question (a list, e.g. -mavx512f;-mavx512bw)
#     <out-var>  set to the flags to add ("" when the compiler is not affected)

set(MOEKIT_GCC_AVX512_BUG_SOURCE ${CMAKE_CURRENT_LIST_DIR}/gcc_avx512_bug.cpp)
option(MOEKIT_GCC_AVX512_MITIGATION
  "Apply the mitigation when the compiler has the GCC 12.2 AVX-512 wrong-code bug (OFF only to measure what it costs: the AVX-512 units may then be miscompiled)" ON)

# True in <out> when compiling the reproducer with <flags> gives the bad instruction; "error"
# when the compiler rejects the flags.
function(_moekit_avx512_bug_present flags out)
  set(asm ${CMAKE_BINARY_DIR}/CMakeFiles/moekit_gcc_avx512_bug.s)
  execute_process(
    COMMAND ${CMAKE_CXX_COMPILER} -std=c++20 -O3 ${flags} -S ${MOEKIT_GCC_AVX512_BUG_SOURCE} -o ${asm}
    RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
  if(NOT rc EQUAL 0)
    set(${out} error PARENT_SCOPE)
    return()
  endif()
  file(STRINGS ${asm} bad REGEX "vpbroadcastq[ \t]+[^,]+,[ \t]*%[yz]mm")
  file(REMOVE ${asm})
  if(bad)
    set(${out} TRUE PARENT_SCOPE)
  else()
    set(${out} FALSE PARENT_SCOPE)
  endif()
endfunction()

function(moekit_gcc_avx512_bug_mitigation flags out)
  set(${out} "" PARENT_SCOPE)
  if(NOT CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|x64)$")
    return()
  endif()
  string(REPLACE ";" " " shown "${flags}")
  _moekit_avx512_bug_present("${flags}" present)
  if(present STREQUAL "error")
    message(STATUS "moekit: GCC AVX-512 wrong-code check (${shown}): the compiler rejects these flags; skipped")
    return()
  endif()
  if(NOT present)
    message(STATUS "moekit: GCC AVX-512 wrong-code check (${shown}): ${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION} not affected")
    return()
  endif()
  if(NOT MOEKIT_GCC_AVX512_MITIGATION)
    message(WARNING "moekit: GCC AVX-512 wrong-code bug found in ${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION} (${shown}) and MOEKIT_GCC_AVX512_MITIGATION=OFF: those units are built without the mitigation and may be miscompiled")
    return()
  endif()
  # Narrowest first: SLP (straight-line) vectorisation only; then all tree vectorisation.
  foreach(candidate -fno-tree-slp-vectorize -fno-tree-vectorize)
    _moekit_avx512_bug_present("${flags};${candidate}" still)
    if(NOT still)
      message(STATUS "moekit: GCC AVX-512 wrong-code bug found in ${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION} (${shown}): those units get ${candidate}")
      set(${out} ${candidate} PARENT_SCOPE)
      return()
    endif()
  endforeach()
  message(FATAL_ERROR "moekit: ${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION} miscompiles ${MOEKIT_GCC_AVX512_BUG_SOURCE} with ${shown} and no known mitigation removes it: use another compiler (clang works)")
endfunction()
