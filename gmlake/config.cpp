#include "gmlake/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <sstream>

namespace glake::gmlake {

namespace {

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t");
  const auto e = s.find_last_not_of(" \t");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

bool parse_bool(const std::string& key, const std::string& v) {
  std::string l = v;
  std::transform(l.begin(), l.end(), l.begin(), [](unsigned char c) { return std::tolower(c); });
  if (l == "1" || l == "true" || l == "yes" || l == "on") return true;
  if (l == "0" || l == "false" || l == "no" || l == "off") return false;
  throw InvalidArgumentError("GLAKE_ALLOC_CONF: " + key + ":" + v + " is not a boolean (true/false)");
}

}  // namespace

std::size_t parse_bytes(const std::string& text) {
  const std::string t = trim(text);
  char* end = nullptr;
  const double number = std::strtod(t.c_str(), &end);
  if (end == t.c_str() || number < 0 || !std::isfinite(number)) {
    throw InvalidArgumentError("'" + text + "' is not a byte count (e.g. 1048576, 512MB, 2GiB)");
  }
  std::string unit = trim(end);
  std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return std::toupper(c); });
  double scale = 1;
  if (unit.empty() || unit == "B") scale = 1;
  else if (unit == "K" || unit == "KB" || unit == "KIB") scale = 1024.0;
  else if (unit == "M" || unit == "MB" || unit == "MIB") scale = 1024.0 * 1024;
  else if (unit == "G" || unit == "GB" || unit == "GIB") scale = 1024.0 * 1024 * 1024;
  else if (unit == "T" || unit == "TB" || unit == "TIB") scale = 1024.0 * 1024 * 1024 * 1024;
  else throw InvalidArgumentError("'" + text + "': unknown unit '" + unit + "' (use B, KB, MB, GB, TB)");
  return static_cast<std::size_t>(number * scale);
}

void AllocatorConfig::set(const std::string& key, const std::string& value) {
  if (key == "stitch") stitch = parse_bool(key, value);
  else if (key == "stitch_min_bytes") stitch_min_bytes = parse_bytes(value);
  else if (key == "stitch_va_limit") stitch_va_limit = parse_bytes(value);
  else if (key == "limit_bytes") limit_bytes = parse_bytes(value);
  else if (key == "memory_fraction") {
    char* end = nullptr;
    const double f = std::strtod(value.c_str(), &end);
    if (end == value.c_str() || *end != '\0' || !(f >= 0.0 && f <= 1.0)) {
      throw InvalidArgumentError("memory_fraction:" + value + " must be a number in [0, 1]");
    }
    memory_fraction = f;
  } else if (key == "small_size") {
    const std::size_t s = parse_bytes(value);
    if (s < 512 || s > (1u << 20)) throw InvalidArgumentError("small_size:" + value + " must be in [512 B, 1 MiB]");
    small_size = s;
  } else if (key == "release_on_oom") release_on_oom = parse_bool(key, value);
  else {
    throw InvalidArgumentError("unknown allocator option '" + key +
                               "' (known: stitch, stitch_min_bytes, stitch_va_limit, limit_bytes, memory_fraction, "
                               "small_size, release_on_oom)");
  }
}

void AllocatorConfig::apply(const std::string& conf) {
  std::stringstream ss(conf);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item = trim(item);
    if (item.empty()) continue;
    const auto colon = item.find(':');
    if (colon == std::string::npos) {
      throw InvalidArgumentError("GLAKE_ALLOC_CONF: '" + item + "' is not key:value");
    }
    set(trim(item.substr(0, colon)), trim(item.substr(colon + 1)));
  }
}

std::map<std::string, std::string> AllocatorConfig::to_map() const {
  return {{"stitch", stitch ? "true" : "false"},
          {"stitch_min_bytes", std::to_string(stitch_min_bytes)},
          {"stitch_va_limit", std::to_string(stitch_va_limit)},
          {"limit_bytes", std::to_string(limit_bytes)},
          {"memory_fraction", std::to_string(memory_fraction)},
          {"small_size", std::to_string(small_size)},
          {"release_on_oom", release_on_oom ? "true" : "false"}};
}

}  // namespace glake::gmlake
