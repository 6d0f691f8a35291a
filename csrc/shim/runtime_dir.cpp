#include "shim/runtime_dir.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>

namespace glake::shim {

std::string runtime_dir(std::string& why) {
  const char* xdg = std::getenv("XDG_RUNTIME_DIR");
  const std::string dir = xdg && *xdg ? std::string(xdg) + "/glake" : "/tmp/glake-" + std::to_string(getuid());
  mkdir(dir.c_str(), 0700);
  struct stat st{};
  if (lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != getuid()) {
    why = dir + " is not a directory of this user";
    return "";
  }
  return dir;
}

std::string private_runtime_dir(std::string& why) {
  const char* xdg = std::getenv("XDG_RUNTIME_DIR");
  struct stat st{};
  const bool xdg_dir = xdg && *xdg && stat(xdg, &st) == 0 && S_ISDIR(st.st_mode);
  const std::string dir = xdg_dir ? std::string(xdg) + "/glake" : "/tmp/glake-" + std::to_string(getuid());
  mkdir(dir.c_str(), 0700);
  if (lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != getuid() || (st.st_mode & 077)) {
    why = dir + " must be a folder of uid " + std::to_string(getuid()) + " with mode 0700";
    return "";
  }
  return dir;
}

}  // namespace glake::shim
