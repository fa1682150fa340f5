#ifndef MQTAPD_CJANSSON_SHIM_H
#define MQTAPD_CJANSSON_SHIM_H
#include <jansson.h>

// json_typeof is a macro; Swift sees functions only.
static inline json_type mqt_json_typeof(const json_t *j) { return json_typeof(j); }
// json_decref/json_incref are static inline with a refcount: re-exported so the wrapper
// has one spelling for them.
static inline void mqt_json_decref(json_t *j) { json_decref(j); }
#endif
