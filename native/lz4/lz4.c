/*
 * The engine's lz4 block codec: liblz4 (the C reference library) behind three N-API functions that work on
 * caller-owned memory, so that no call allocates. repo-format/compression.ts frames the blocks (SPEC.md,
 * section 5) and falls back to lz4-napi where this addon is not built.
 *
 *   compressBound(length) -> the most bytes a block of `length` input bytes compresses to
 *   compress(source, target) -> bytes written to target, or 0 when the block does not fit in target
 *   decompress(source, target) -> bytes written to target, or -1 when source is not one whole, valid lz4 block
 *                                 that decodes into at most target's length
 *
 * Every length comes from the typed arrays themselves, never from the caller or the data: LZ4_decompress_safe
 * never reads past source's end nor writes past target's, whatever a hostile block says.
 */
#include <limits.h>
#include <lz4.h>
#include <node_api.h>
#include <stddef.h>

/* Throws and returns 1 unless napi says ok. */
static int failed(napi_env env, napi_status status, const char *what) {
  if (status == napi_ok) return 0;
  napi_throw_type_error(env, "ENGINE_LZ4_ARGUMENT", what);
  return 1;
}

/* The bytes of a Buffer, Uint8Array or other TypedArray argument; 1 (with an exception pending) if it is none. */
static int bytes_of(napi_env env, napi_value value, char **data, size_t *length, const char *what) {
  bool is_typed = false;
  if (failed(env, napi_is_typedarray(env, value, &is_typed), what)) return 1;
  if (!is_typed) {
    napi_throw_type_error(env, "ENGINE_LZ4_ARGUMENT", what);
    return 1;
  }
  napi_typedarray_type type;
  size_t element_count = 0;
  void *start = NULL;
  if (failed(env, napi_get_typedarray_info(env, value, &type, &element_count, &start, NULL, NULL), what)) return 1;
  if (type != napi_uint8_array) {
    napi_throw_type_error(env, "ENGINE_LZ4_ARGUMENT", what);
    return 1;
  }
  /* liblz4 takes int sizes; a block of ours is at most a few MiB. */
  if (element_count > (size_t)LZ4_MAX_INPUT_SIZE) {
    napi_throw_range_error(env, "ENGINE_LZ4_ARGUMENT", "lz4: buffer larger than LZ4_MAX_INPUT_SIZE");
    return 1;
  }
  *data = start;
  *length = element_count;
  return 0;
}

static napi_value number(napi_env env, double value) {
  napi_value result = NULL;
  napi_create_double(env, value, &result);
  return result;
}

/* The two buffer arguments of compress and decompress. */
static int two_buffers(napi_env env, napi_callback_info info, char **source, size_t *source_length, char **target, size_t *target_length) {
  size_t argc = 2;
  napi_value argv[2];
  if (failed(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL), "lz4: bad arguments")) return 1;
  if (argc != 2) {
    napi_throw_type_error(env, "ENGINE_LZ4_ARGUMENT", "lz4: expects (source, target)");
    return 1;
  }
  if (bytes_of(env, argv[0], source, source_length, "lz4: source must be a Uint8Array")) return 1;
  return bytes_of(env, argv[1], target, target_length, "lz4: target must be a Uint8Array");
}

static napi_value compress_bound(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  double length = -1;
  if (failed(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL), "lz4: bad arguments")) return NULL;
  if (argc != 1 || napi_get_value_double(env, argv[0], &length) != napi_ok || !(length >= 0) || length > LZ4_MAX_INPUT_SIZE || length != (double)(int)length) {
    napi_throw_range_error(env, "ENGINE_LZ4_ARGUMENT", "lz4: compressBound expects a whole length up to LZ4_MAX_INPUT_SIZE");
    return NULL;
  }
  return number(env, LZ4_compressBound((int)length));
}

static napi_value compress(napi_env env, napi_callback_info info) {
  char *source, *target;
  size_t source_length, target_length;
  if (two_buffers(env, info, &source, &source_length, &target, &target_length)) return NULL;
  /* Acceleration 1, liblz4's default: the same setting lz4_flex (lz4-napi) uses. 0: target too small. */
  return number(env, LZ4_compress_default(source, target, (int)source_length, (int)target_length));
}

static napi_value decompress(napi_env env, napi_callback_info info) {
  char *source, *target;
  size_t source_length, target_length;
  if (two_buffers(env, info, &source, &source_length, &target, &target_length)) return NULL;
  int written = LZ4_decompress_safe(source, target, (int)source_length, (int)target_length);
  return number(env, written < 0 ? -1 : written);
}

NAPI_MODULE_INIT(/* napi_env env, napi_value exports */) {
  napi_property_descriptor functions[] = {
    {"compressBound", NULL, compress_bound, NULL, NULL, NULL, napi_enumerable, NULL},
    {"compress", NULL, compress, NULL, NULL, NULL, napi_enumerable, NULL},
    {"decompress", NULL, decompress, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  if (napi_define_properties(env, exports, sizeof functions / sizeof functions[0], functions) != napi_ok) return NULL;
  return exports;
}
