// SPDX-License-Identifier: Apache-2.0
// Internal: strict typed reads of moekit's JSON configs (unknown keys are errors).
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

#include "moekit/error.hpp"

namespace moekit::detail {

using json = nlohmann::json;

/// A JSON value for an error message: its text, cut after 200 characters (a hostile config
/// may hold a 200,000-element array where a number belongs).
inline std::string excerpt(const json& v) {
  std::string text = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > 200) text = text.substr(0, 200) + "...(" + std::to_string(text.size()) + " characters)";
  return text;
}

/// A key in double quotes for an error message; past 200 characters, its first 197 and "..."
/// followed by the length (the CLI cuts quoted values the same way).
inline std::string quoted_key(const std::string& k) {
  std::string out(1, '"');
  if (k.size() <= 200) {
    out.append(k).push_back('"');
    return out;
  }
  out.append(k, 0, 197).append("...\" (").append(std::to_string(k.size())).append(" characters)");
  return out;
}

// Typed reads of one JSON object that remember which keys were used, so moekit's own
// format can reject unknown keys. `where` names the object in error messages.
class Reader {
 public:
  Reader(const json& j, std::string where) : j_(j), where_(std::move(where)) {
    MOEKIT_CHECK(j_.is_object(), where_, ": expected a JSON object, got ", j_.type_name());
  }
  bool has(const std::string& key) const { return j_.contains(key) && !j_.at(key).is_null(); }
  const json& raw(const std::string& key) {
    used_.insert(key);
    return j_.at(key);
  }
  int64_t integer(const std::string& key, int64_t def) {
    used_.insert(key);
    if (!has(key)) return def;
    const json& v = j_.at(key);
    if (v.is_number_integer()) {
      MOEKIT_CHECK(!v.is_number_unsigned() || v.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX), where_, ".", key,
                   ": expected an integer below 2^63, got ", excerpt(v));
      return v.get<int64_t>();
    }
    // 2.0 is accepted as 2; the range check comes before the cast (no undefined conversion).
    const bool integral = v.is_number_float() && std::isfinite(v.get<double>()) && std::fabs(v.get<double>()) < 9.0e15 &&
                          v.get<double>() == std::floor(v.get<double>());
    MOEKIT_CHECK(integral, where_, ".", key, ": expected an integer, got ", excerpt(v));
    return static_cast<int64_t>(v.get<double>());
  }
  int64_t required_integer(const std::string& key) {
    MOEKIT_CHECK(has(key), where_, ".", key, ": expected an integer, got nothing (the key is required)");
    return integer(key, 0);
  }
  double number(const std::string& key, double def) {
    used_.insert(key);
    if (!has(key)) return def;
    const json& v = j_.at(key);
    MOEKIT_CHECK(v.is_number(), where_, ".", key, ": expected a number, got ", excerpt(v));
    return v.get<double>();
  }
  bool boolean(const std::string& key, bool def) {
    used_.insert(key);
    if (!has(key)) return def;
    const json& v = j_.at(key);
    MOEKIT_CHECK(v.is_boolean(), where_, ".", key, ": expected true or false, got ", excerpt(v));
    return v.get<bool>();
  }
  std::string string(const std::string& key, const std::string& def) {
    used_.insert(key);
    if (!has(key)) return def;
    const json& v = j_.at(key);
    MOEKIT_CHECK(v.is_string(), where_, ".", key, ": expected a string, got ", excerpt(v));
    return v.get<std::string>();
  }
  /// A string that must be one of `choices` (error lists them).
  std::string choice(const std::string& key, const std::string& def, std::initializer_list<const char*> choices) {
    const std::string v = string(key, def);
    std::string list;
    for (const char* c : choices) {
      if (v == c) return v;
      list += (list.empty() ? "" : ", ") + std::string(c);
    }
    fail(where_, ".", key, ": expected one of ", list, "; got \"", v, "\"");
  }
  void mark(const std::string& key) { used_.insert(key); }
  // moekit's own format: every key must have been read.
  void reject_unknown() const {
    for (auto it = j_.begin(); it != j_.end(); ++it)
      MOEKIT_CHECK(used_.count(it.key()) != 0, where_, ": unknown key ", quoted_key(it.key()));
  }
  const std::string& where() const { return where_; }

 private:
  const json& j_;
  std::string where_;
  std::set<std::string> used_;
};

}  // namespace moekit::detail
