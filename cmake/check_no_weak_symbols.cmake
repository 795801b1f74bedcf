# SPDX-License-Identifier: Apache-2.0
# ctest script: fails if a per-ISA kernel object file defines a weak symbol (nm types W, V, u
# and their lower-case forms). Such a symbol (an inline or template function from a header,
# compiled there with AVX2 / AVX-512 instructions) may be picked by the linker for every
# translation unit and crash with SIGILL on a CPU without that instruction set.
# Usage: cmake -DNM=<nm> -DOBJECTS=<a.o|b.o|...> -P check_no_weak_symbols.cmake
if(NOT NM OR NOT OBJECTS)
  message(FATAL_ERROR "usage: cmake -DNM=<nm> -DOBJECTS=<obj|obj|...> -P ${CMAKE_CURRENT_LIST_FILE}")
endif()
string(REPLACE "|" ";" objects "${OBJECTS}")
set(bad "")
foreach(obj IN LISTS objects)
  if(NOT EXISTS "${obj}")
    message(FATAL_ERROR "no object file ${obj} (build the moekit target first)")
  endif()
  execute_process(COMMAND "${NM}" -C --defined-only "${obj}" OUTPUT_VARIABLE out RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${NM} failed on ${obj}")
  endif()
  string(REPLACE "\n" ";" lines "${out}")
  set(count 0)
  foreach(line IN LISTS lines)
    if(line MATCHES "^[0-9a-fA-F]* *([A-Za-z]) (.*)$")
      math(EXPR count "${count} + 1")
      set(type "${CMAKE_MATCH_1}")
      set(name "${CMAKE_MATCH_2}")
      # DW.ref.__gxx_personality_v0 is a data pointer to the C++ personality routine, not code.
      if(type MATCHES "^[WwVvu]$" AND NOT name STREQUAL "DW.ref.__gxx_personality_v0")
        string(APPEND bad "  ${obj}: ${type} ${name}\n")
      endif()
    endif()
  endforeach()
  message(STATUS "${obj}: ${count} defined symbols")
endforeach()
if(bad)
  message(FATAL_ERROR "weak symbols defined by per-ISA kernel objects:\n${bad}")
endif()
