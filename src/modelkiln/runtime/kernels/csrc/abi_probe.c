/* Checks ort_abi.h against a real ONNX Runtime library, outside any session.
 *
 *   cc -o abi_probe abi_probe.c -ldl && ./abi_probe /path/to/libonnxruntime.so.1.x
 *
 * Not part of the kernel library: tests/runtime/test_kernels.py builds and runs it where a C
 * compiler exists. It calls every OrtApi entry of ort_abi.h that works without a running kernel
 * (status, tensor info, custom-op domain) and checks what comes back, plus two anchors read by
 * raw index (GetBuildInfoString at 254, and a tensor created through CreateTensorAsOrtValue at 48),
 * so a miscounted table fails here with a message rather than as a crash inside a session. The
 * entries only a running kernel can call (KernelContext_*, KernelInfo_*, ShapeInferContext_*) are
 * exercised by the session tests. Exit status 0: every check passed.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "ort_abi.h"

static int failures;

#define CHECK(cond, what)                                  \
  do {                                                     \
    if (cond) {                                            \
      printf("ok   %s\n", what);                           \
    } else {                                               \
      printf("FAIL %s\n", what);                           \
      failures++;                                          \
    }                                                      \
  } while (0)

/* Entries used only here, called by index (not declared in ort_abi.h: the library does not use them). */
typedef OrtStatus *(*GetAllocatorFn)(OrtAllocator **out);                       /* 78 */
typedef OrtStatus *(*CreateTensorFn)(OrtAllocator *alloc, const int64_t *shape, size_t rank, int type,
                                     OrtValue **out);                             /* 48 */
typedef void (*ReleaseValueFn)(OrtValue *value);                                  /* 96 */
typedef const char *(*BuildInfoFn)(void);                                         /* 254 */

static void *slot(const OrtApi *api, size_t index) { return ((void *const *)api)[index]; }

static int ok(const OrtApi *api, OrtStatus *st, const char *what) {
  if (st == NULL) return 1;
  printf("FAIL %s: %s\n", what, api->GetErrorMessage(st));
  api->ReleaseStatus(st);
  failures++;
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s /path/to/libonnxruntime.so\n", argv[0]);
    return 2;
  }
  void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return 2;
  }
  const OrtApiBase *(*get_base)(void) = (const OrtApiBase *(*)(void))dlsym(lib, "OrtGetApiBase");
  if (!get_base) {
    fprintf(stderr, "%s has no OrtGetApiBase\n", argv[1]);
    return 2;
  }
  const OrtApiBase *base = get_base();
  printf("onnxruntime %s\n", base->GetVersionString());
  const OrtApi *api = base->GetApi(KILN_ORT_API_VERSION);
  CHECK(api != NULL, "GetApi(KILN_ORT_API_VERSION)");
  if (!api) return 1;

  /* 0, 1, 2, 93: a status round trip */
  OrtStatus *st = api->CreateStatus(KILN_ORT_INVALID_ARGUMENT, "kiln probe");
  CHECK(st != NULL && api->GetErrorCode(st) == KILN_ORT_INVALID_ARGUMENT, "CreateStatus/GetErrorCode");
  CHECK(st != NULL && strcmp(api->GetErrorMessage(st), "kiln probe") == 0, "GetErrorMessage");
  api->ReleaseStatus(st);

  /* 254: an anchor far down the table */
  const char *build = ((BuildInfoFn)slot(api, 254))();
  CHECK(build != NULL && strstr(build, "ORT Build Info") != NULL, "GetBuildInfoString at 254");

  /* 26, 101: a custom-op domain */
  OrtCustomOpDomain *domain = NULL;
  if (ok(api, api->CreateCustomOpDomain("ai.modelkiln.probe", &domain), "CreateCustomOpDomain")) {
    CHECK(domain != NULL, "CreateCustomOpDomain gives a domain");
    api->ReleaseCustomOpDomain(domain);
  }

  /* 51, 60-65, 99 on a real tensor of shape [2, 3, 5] uint8 */
  OrtAllocator *alloc = NULL;
  OrtValue *value = NULL;
  const int64_t shape[3] = {2, 3, 5};
  if (ok(api, ((GetAllocatorFn)slot(api, 78))(&alloc), "GetAllocatorWithDefaultOptions") &&
      ok(api, ((CreateTensorFn)slot(api, 48))(alloc, shape, 3, KILN_ELEM_UINT8, &value), "CreateTensorAsOrtValue")) {
    OrtTensorTypeAndShapeInfo *info = NULL;
    if (ok(api, api->GetTensorTypeAndShape(value, &info), "GetTensorTypeAndShape")) {
      KilnElemType type = KILN_ELEM_UNDEFINED;
      size_t rank = 0, count = 0;
      int64_t dims[3] = {0, 0, 0};
      const char *names[3] = {"x", "x", "x"};
      CHECK(ok(api, api->GetTensorElementType(info, &type), "GetTensorElementType") && type == KILN_ELEM_UINT8,
            "GetTensorElementType is uint8");
      CHECK(ok(api, api->GetDimensionsCount(info, &rank), "GetDimensionsCount") && rank == 3,
            "GetDimensionsCount is 3");
      CHECK(ok(api, api->GetDimensions(info, dims, 3), "GetDimensions") && dims[0] == 2 && dims[1] == 3 &&
                dims[2] == 5,
            "GetDimensions is [2, 3, 5]");
      CHECK(ok(api, api->GetSymbolicDimensions(info, names, 3), "GetSymbolicDimensions") && names[0] &&
                names[0][0] == '\0' && names[2] && names[2][0] == '\0',
            "GetSymbolicDimensions is unnamed");
      CHECK(ok(api, api->GetTensorShapeElementCount(info, &count), "GetTensorShapeElementCount") && count == 30,
            "GetTensorShapeElementCount is 30");
      api->ReleaseTensorTypeAndShapeInfo(info);
    }
    void *data = NULL;
    if (ok(api, api->GetTensorMutableData(value, &data), "GetTensorMutableData")) {
      CHECK(data != NULL, "GetTensorMutableData gives the buffer");
      if (data) memset(data, 7, 30);
    }
    ((ReleaseValueFn)slot(api, 96))(value);
  }

  /* 57-59, 271, 63: a type-and-shape info built by hand, symbolic names round trip */
  OrtTensorTypeAndShapeInfo *made = NULL;
  if (ok(api, api->CreateTensorTypeAndShapeInfo(&made), "CreateTensorTypeAndShapeInfo")) {
    const int64_t dims[2] = {-1, 4};
    const char *names[2] = {"batch", ""};
    const char *back[2] = {NULL, NULL};
    int64_t got[2] = {0, 0};
    KilnElemType type = KILN_ELEM_UNDEFINED;
    ok(api, api->SetTensorElementType(made, KILN_ELEM_INT8), "SetTensorElementType");
    ok(api, api->SetDimensions(made, dims, 2), "SetDimensions");
    ok(api, api->SetSymbolicDimensions(made, names, 2), "SetSymbolicDimensions");
    CHECK(ok(api, api->GetTensorElementType(made, &type), "GetTensorElementType") && type == KILN_ELEM_INT8,
          "SetTensorElementType round trip");
    CHECK(ok(api, api->GetDimensions(made, got, 2), "GetDimensions") && got[0] == -1 && got[1] == 4,
          "SetDimensions round trip");
    CHECK(ok(api, api->GetSymbolicDimensions(made, back, 2), "GetSymbolicDimensions") && back[0] &&
              strcmp(back[0], "batch") == 0 && back[1] && back[1][0] == '\0',
          "SetSymbolicDimensions round trip");
    api->ReleaseTensorTypeAndShapeInfo(made);
  }

  printf("%s\n", failures ? "ABI PROBE FAILED" : "ABI PROBE OK");
  return failures ? 1 : 0;
}
