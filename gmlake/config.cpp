#include "gmlake/config.h"

#include "common/conf.h"

namespace glake::gmlake {

std::size_t parse_bytes(const std::string& text) { return conf::parse_bytes(text); }

AllocatorConfig AllocatorConfig::from_env() {
  AllocatorConfig c;
  c.apply(conf::env(kConfEnv), kConfEnv);
  return c;
}

void AllocatorConfig::set(const std::string& key, const std::string& value, const std::string& source) {
  if (key == "stitch") stitch = conf::parse_bool(value, key, source);
  else if (key == "stitch_min_bytes") stitch_min_bytes = conf::parse_bytes(value, key, source);
  else if (key == "stitch_va_limit") stitch_va_limit = conf::parse_bytes(value, key, source);
  else if (key == "limit_bytes") limit_bytes = conf::parse_bytes(value, key, source);
  else if (key == "memory_fraction") memory_fraction = conf::parse_double(value, key, source, 0.0, 1.0);
  else if (key == "small_size") {
    const std::size_t s = conf::parse_bytes(value, key, source);
    if (s < 512 || s > (1u << 20)) conf::fail(key, value, source, "must be in [512 B, 1 MiB]");
    small_size = s;
  } else if (key == "chunk_bytes") {
    const std::size_t c = conf::parse_bytes(value, key, source);
    if (c < (2u << 20) || c % (2u << 20) != 0) conf::fail(key, value, source, "must be a multiple of 2 MiB");
    chunk_bytes = c;
  } else if (key == "release_on_oom") release_on_oom = conf::parse_bool(value, key, source);
  else {
    throw InvalidArgumentError("unknown allocator option '" + key + "' in " + conf::describe(key, value, source) +
                               " (known: stitch, stitch_min_bytes, stitch_va_limit, limit_bytes, memory_fraction, "
                               "small_size, chunk_bytes, release_on_oom)");
  }
}

void AllocatorConfig::apply(const std::string& text, const std::string& source) {
  AllocatorConfig next = *this;  // all or nothing
  for (const auto& [key, value] : conf::split(text, source)) next.set(key, value, source);
  *this = next;
}

std::map<std::string, std::string> AllocatorConfig::to_map() const {
  return {{"stitch", stitch ? "true" : "false"},
          {"stitch_min_bytes", std::to_string(stitch_min_bytes)},
          {"stitch_va_limit", std::to_string(stitch_va_limit)},
          {"limit_bytes", std::to_string(limit_bytes)},
          {"memory_fraction", std::to_string(memory_fraction)},
          {"small_size", std::to_string(small_size)},
          {"chunk_bytes", std::to_string(chunk_bytes)},
          {"release_on_oom", release_on_oom ? "true" : "false"}};
}

std::string AllocatorConfig::to_string() const {
  std::string out;
  for (const auto& [key, value] : to_map()) out += (out.empty() ? "" : ",") + key + ":" + value;
  return out;
}

}  // namespace glake::gmlake
