// The per-user runtime folder of the shim's files (stats pages, the dedup broker's socket).
#pragma once

#include <string>

namespace glake::shim {

/// The per-user directory glake/stats/paths.py uses ($XDG_RUNTIME_DIR/glake, else /tmp/glake-$UID),
/// created 0700; "" (with `why`) when it is not a private directory of this user.
std::string runtime_dir(std::string& why);

}  // namespace glake::shim
