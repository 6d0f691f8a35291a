// The configuration syntax every glake layer shares: "key:value,key:value" lists (torch's style),
// byte counts, booleans and integers, with errors that name the key, the value and where it came from.
// Header-only: the allocator (gmlake/config.cpp) and the copy engine (multipath/config.cpp) both use it,
// and it is the one parser Python reaches too (through glake._C), so every layer accepts the same text.
#pragma once

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/error.h"

namespace glake::conf {

/// The source of values given as keyword arguments (glake.Allocator(limit_bytes=...), Engine(threads=...)).
inline const std::string kKeyword = "keyword argument";

/// How an error names one setting: "limit_bytes=-5 (keyword argument)" or "limit_bytes:-5 (GLAKE_ALLOC_CONF)".
inline std::string describe(const std::string& key, const std::string& value, const std::string& source) {
  if (source.empty()) return key.empty() ? "'" + value + "'" : key + ":" + value;
  if (source == kKeyword) return key + "=" + value + " (" + source + ")";
  return key + ":" + value + " (" + source + ")";
}

/// Throws InvalidArgumentError "<setting>: <problem>".
[[noreturn]] inline void fail(const std::string& key, const std::string& value, const std::string& source,
                              const std::string& problem) {
  throw InvalidArgumentError(describe(key, value, source) + ": " + problem);
}

/// `s` without leading and trailing blanks.
inline std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\n");
  const auto e = s.find_last_not_of(" \t\n");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

/// Splits "key:value,key:value" into trimmed (key, value) pairs; empty items are skipped.
inline std::vector<std::pair<std::string, std::string>> split(const std::string& text, const std::string& source) {
  std::vector<std::pair<std::string, std::string>> out;
  std::size_t start = 0;
  while (start <= text.size()) {
    std::size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    const std::string item = trim(text.substr(start, end - start));
    start = end + 1;
    if (item.empty()) continue;
    const auto colon = item.find(':');
    if (colon == std::string::npos || trim(item.substr(0, colon)).empty()) {
      throw InvalidArgumentError((source.empty() ? std::string("configuration") : source) + ": '" + item +
                                 "' is not key:value (expected e.g. 'stitch:false,limit_bytes:8GB')");
    }
    out.emplace_back(trim(item.substr(0, colon)), trim(item.substr(colon + 1)));
  }
  return out;
}

/// Parses a byte count: "1048576", "512KB", "4MiB", "2GB", "1.5GiB" (K, M, G, T are powers of 1024).
inline std::size_t parse_bytes(const std::string& text, const std::string& key = "", const std::string& source = "") {
  const std::string t = trim(text);
  std::size_t i = 0, digits = 0;
  auto digit = [&t](std::size_t k) { return k < t.size() && std::isdigit(static_cast<unsigned char>(t[k])); };
  for (; digit(i); ++i) ++digits;
  if (i < t.size() && t[i] == '.') {
    for (++i; digit(i); ++i) ++digits;
  }
  if (digits == 0) fail(key, text, source, "not a byte count (a non-negative number with an optional unit: "
                                            "1048576, 512MB, 2GiB)");
  const double number = std::strtod(t.substr(0, i).c_str(), nullptr);
  std::string unit = trim(t.substr(i));
  std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return std::toupper(c); });
  double scale = 1;
  if (unit.empty() || unit == "B") scale = 1;
  else if (unit == "K" || unit == "KB" || unit == "KIB") scale = 1024.0;
  else if (unit == "M" || unit == "MB" || unit == "MIB") scale = 1024.0 * 1024;
  else if (unit == "G" || unit == "GB" || unit == "GIB") scale = 1024.0 * 1024 * 1024;
  else if (unit == "T" || unit == "TB" || unit == "TIB") scale = 1024.0 * 1024 * 1024 * 1024;
  else fail(key, text, source, "unknown unit '" + unit + "' (use B, KB, MB, GB, TB; K, M, G, T are powers of 1024)");
  const double bytes = number * scale;
  if (!(bytes < 9.2e18)) fail(key, text, source, "too large a byte count");
  return static_cast<std::size_t>(bytes);
}

/// Parses true/false, 1/0, yes/no, on/off (any case).
inline bool parse_bool(const std::string& text, const std::string& key = "", const std::string& source = "") {
  std::string l = trim(text);
  std::transform(l.begin(), l.end(), l.begin(), [](unsigned char c) { return std::tolower(c); });
  if (l == "1" || l == "true" || l == "yes" || l == "on") return true;
  if (l == "0" || l == "false" || l == "no" || l == "off") return false;
  fail(key, text, source, "not a boolean (true/false, 1/0, yes/no, on/off)");
}

/// Parses a whole decimal integer within [lo, hi].
inline long long parse_int(const std::string& text, const std::string& key, const std::string& source, long long lo,
                           long long hi) {
  const std::string t = trim(text);
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(t.c_str(), &end, 10);
  if (t.empty() || end != t.c_str() + t.size() || errno == ERANGE) fail(key, text, source, "not an integer");
  if (v < lo || v > hi) {
    fail(key, text, source, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  }
  return v;
}

/// Parses a decimal number within [lo, hi].
inline double parse_double(const std::string& text, const std::string& key, const std::string& source, double lo,
                           double hi) {
  const std::string t = trim(text);
  char* end = nullptr;
  const double v = std::strtod(t.c_str(), &end);
  if (t.empty() || end != t.c_str() + t.size() || !std::isfinite(v)) fail(key, text, source, "not a number");
  if (!(v >= lo && v <= hi)) {
    fail(key, text, source, "must be a number in [" + std::to_string(lo).substr(0, 3) + ", " +
                                std::to_string(hi).substr(0, 3) + "]");
  }
  return v;
}

/// The value of environment variable `name`, or "" when unset.
inline std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

}  // namespace glake::conf
