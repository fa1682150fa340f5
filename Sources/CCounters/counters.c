// The counter primitives are header-only (static inline); SwiftPM needs one source file.
#include "CCounters.h"
