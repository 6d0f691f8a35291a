// The per-user runtime folders of the shim's files: stats pages (glake/stats/paths.py's rule) and the
// dedup broker's socket (glake/_runtime.py's rule, stricter).
#pragma once

#include <string>

namespace glake::shim {

/// The per-user directory glake/stats/paths.py uses ($XDG_RUNTIME_DIR/glake, else /tmp/glake-$UID),
/// created 0700; "" (with `why`) when it is not a private directory of this user.
std::string runtime_dir(std::string& why);

/// The directory glake/_runtime.py's runtime_dir() uses (the dedup broker's socket): $XDG_RUNTIME_DIR/glake
/// when XDG_RUNTIME_DIR is a directory, else /tmp/glake-$UID, created 0700; "" (with `why`) unless it is
/// this user's and closed to group and others.
std::string private_runtime_dir(std::string& why);

}  // namespace glake::shim
