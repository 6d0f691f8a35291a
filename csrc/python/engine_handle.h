// Python's handle on a multipath copy engine, shared by the bindings that take one (glake.suspend's
// copies go through it).
#pragma once

#include <memory>

#include "common/error.h"
#include "multipath/engine.h"

namespace glake::py_bind {

/// Python's handle on an engine; close() lets it go before the object is collected.
struct PyEngine {
  std::shared_ptr<multipath::CopyEngine> e;
  std::shared_ptr<multipath::CopyEngine> get() const {
    if (!e) throw InvalidArgumentError("this multipath engine is closed");
    return e;
  }
};

}  // namespace glake::py_bind
