# SPDX-License-Identifier: Apache-2.0
# ctest script: runs the GCC AVX-512 wrong-code reproducer (cmake/gcc_avx512_bug.cpp), built
# with the AVX-512 kernel unit's flags and mitigation, and fails unless it computes the right
# constant. Only an AVX-512 CPU can run it; elsewhere it says SKIPPED (the configure-time
# assembly check still covers the compiler).
# Usage: cmake -DEXE=<reproducer> -P run_gcc_avx512_bug_check.cmake
if(NOT EXE)
  message(FATAL_ERROR "usage: cmake -DEXE=<reproducer> -P ${CMAKE_CURRENT_LIST_FILE}")
endif()
set(avx512 FALSE)
if(EXISTS /proc/cpuinfo)
  file(STRINGS /proc/cpuinfo flags REGEX "^flags" LIMIT_COUNT 1)
  if(flags MATCHES " avx512f( |$)" AND flags MATCHES " avx512bw( |$)" AND flags MATCHES " avx512vl( |$)")
    set(avx512 TRUE)
  endif()
endif()
if(NOT avx512)
  message(STATUS "SKIPPED: this CPU has no AVX-512 F/BW/VL to run the reproducer on")
  return()
endif()
execute_process(COMMAND "${EXE}" OUTPUT_VARIABLE out RESULT_VARIABLE rc)
string(STRIP "${out}" out)
if(NOT rc EQUAL 0 OR NOT out STREQUAL "8 8 0 0 eq=1")
  message(FATAL_ERROR "the AVX-512 unit's flags still miscompile the reproducer: printed \"${out}\" (exit ${rc}), expected \"8 8 0 0 eq=1\"")
endif()
message(STATUS "reproducer built with the AVX-512 unit's flags prints \"${out}\": not miscompiled")
