// Prints host_digest(...).hex() of each file named on the command line, one line each: the host side
// of dedup's content digest (csrc/shim/dedup_digest.h), checked by tests/shim/test_dedup_digest.py.
#include <cstdio>
#include <fstream>
#include <iterator>
#include <vector>

#include "shim/dedup_digest.h"

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::ifstream in(argv[i], std::ios::binary);
    if (!in) {
      std::fprintf(stderr, "cannot read %s\n", argv[i]);
      return 1;
    }
    const std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::printf("%s\n", glake::shim::dedup::host_digest(data.data(), data.size()).hex().c_str());
  }
  return 0;
}
