/* modelkiln's own minimal declarations of the ONNX Runtime C ABI, written for this library.
 *
 * Why our own: no ONNX Runtime headers ship with the pip wheel, and the ABI is small and stable.
 * ONNX Runtime hands out one table of function pointers (OrtApi) whose order is append-only: an
 * entry never moves once released, so an entry's index is the same in every later version. We
 * declare only the entries this library (and csrc/abi_probe.c) calls, each at its index; the
 * slots between them are opaque pointer padding.
 *
 * Where the indices come from: the member order of struct OrtApi in ONNX Runtime's public C API
 * header (include/onnxruntime/core/session/onnxruntime_c_api.h), counted from 0, as read for
 * ORT_API_VERSION 22 (in a binding generated from that header), and for entries 0-101 also
 * against the header's own text at ORT_API_VERSION 13. Every entry we use exists since API
 * version 17 (ONNX Runtime 1.17) or earlier, so we ask GetApi for version 17 (pyproject needs
 * onnxruntime>=1.20; this was verified on 1.32). The static asserts below pin each index to its
 * byte offset; csrc/abi_probe.c calls every entry usable outside a session on the installed ONNX
 * Runtime (plus anchors at 48 and 254) and tests/runtime/test_kernels.py runs the rest in sessions.
 *
 * OrtCustomOp: the layout up to GetEndVersion (custom-op struct version 17). We set `version` to
 * 17, the lowest version whose fields we fill (KernelComputeV2 is read from 16, InferOutputShapeFn
 * from 17), so ONNX Runtime reads no member past GetEndVersion.
 */
#ifndef KILN_ORT_ABI_H
#define KILN_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The OrtApi version we request and declare our custom ops against. */
#define KILN_ORT_API_VERSION 17u

/* ---- opaque handles (never dereferenced here) ---- */
typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtShapeInferContext OrtShapeInferContext;
typedef struct OrtAllocator OrtAllocator;
typedef struct OrtApi OrtApi;
typedef struct OrtCustomOp OrtCustomOp;

/* ---- enum values we use (ints on the ABI: every C enum here is int-sized) ---- */
/* ONNXTensorElementDataType: the TensorProto.DataType numbers. */
enum {
  KILN_ELEM_UNDEFINED = 0,
  KILN_ELEM_FLOAT = 1,
  KILN_ELEM_UINT8 = 2,
  KILN_ELEM_INT8 = 3
};
typedef int KilnElemType;

/* OrtErrorCode */
enum {
  KILN_ORT_OK = 0,
  KILN_ORT_FAIL = 1,
  KILN_ORT_INVALID_ARGUMENT = 2,
  KILN_ORT_RUNTIME_EXCEPTION = 6,
  KILN_ORT_INVALID_GRAPH = 10
};
typedef int KilnOrtErrorCode;

/* OrtMemType: OrtMemTypeDefault */
#define KILN_ORT_MEM_DEFAULT 0
/* OrtCustomOpInputOutputCharacteristic: INPUT_OUTPUT_REQUIRED */
#define KILN_ORT_IO_REQUIRED 0

/* ---- OrtApiBase: what OrtGetApiBase() returns and RegisterCustomOps receives ---- */
typedef struct OrtApiBase {
  const OrtApi *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

/* ---- the OrtApi entries we call, at their indices ---- */
#define KILN_PAD(first, last) void *pad_##first##_##last[(last) - (first) + 1]

struct OrtApi {
  /* 0 */ OrtStatus *(*CreateStatus)(KilnOrtErrorCode code, const char *msg);
  /* 1 */ KilnOrtErrorCode (*GetErrorCode)(const OrtStatus *status);
  /* 2 */ const char *(*GetErrorMessage)(const OrtStatus *status);
  KILN_PAD(3, 25);
  /* 26 */ OrtStatus *(*CreateCustomOpDomain)(const char *domain, OrtCustomOpDomain **out);
  /* 27 */ OrtStatus *(*CustomOpDomain_Add)(OrtCustomOpDomain *domain, const struct OrtCustomOp *op);
  /* 28 */ OrtStatus *(*AddCustomOpDomain)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
  KILN_PAD(29, 50);
  /* 51 */ OrtStatus *(*GetTensorMutableData)(OrtValue *value, void **out);
  KILN_PAD(52, 56);
  /* 57 */ OrtStatus *(*CreateTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo **out);
  /* 58 */ OrtStatus *(*SetTensorElementType)(OrtTensorTypeAndShapeInfo *info, KilnElemType type);
  /* 59 */ OrtStatus *(*SetDimensions)(OrtTensorTypeAndShapeInfo *info, const int64_t *dims, size_t count);
  /* 60 */ OrtStatus *(*GetTensorElementType)(const OrtTensorTypeAndShapeInfo *info, KilnElemType *out);
  /* 61 */ OrtStatus *(*GetDimensionsCount)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
  /* 62 */ OrtStatus *(*GetDimensions)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t count);
  /* 63 */ OrtStatus *(*GetSymbolicDimensions)(const OrtTensorTypeAndShapeInfo *info, const char **names,
                                               size_t count);
  /* 64 */ OrtStatus *(*GetTensorShapeElementCount)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
  /* 65 */ OrtStatus *(*GetTensorTypeAndShape)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
  KILN_PAD(66, 89);
  /* 90 */ OrtStatus *(*KernelContext_GetInput)(const OrtKernelContext *context, size_t index,
                                                const OrtValue **out);
  /* 91 */ OrtStatus *(*KernelContext_GetOutput)(OrtKernelContext *context, size_t index,
                                                 const int64_t *dims, size_t dim_count, OrtValue **out);
  KILN_PAD(92, 92);
  /* 93 */ void (*ReleaseStatus)(OrtStatus *status);
  KILN_PAD(94, 98);
  /* 99 */ void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo *info);
  KILN_PAD(100, 100);
  /* 101 */ void (*ReleaseCustomOpDomain)(OrtCustomOpDomain *domain);
  KILN_PAD(102, 243);
  /* 244 */ OrtStatus *(*KernelInfo_GetNodeName)(const OrtKernelInfo *info, char *out, size_t *size);
  KILN_PAD(245, 248);
  /* 249 */ OrtStatus *(*KernelInfoGetConstantInput_tensor)(const OrtKernelInfo *info, size_t index,
                                                           int *is_constant, const OrtValue **out);
  KILN_PAD(250, 267);
  /* 268 */ OrtStatus *(*ShapeInferContext_GetInputTypeShape)(const OrtShapeInferContext *context,
                                                             size_t index, OrtTensorTypeAndShapeInfo **info);
  KILN_PAD(269, 269);
  /* 270 */ OrtStatus *(*ShapeInferContext_SetOutputTypeShape)(const OrtShapeInferContext *context,
                                                              size_t index,
                                                              const OrtTensorTypeAndShapeInfo *info);
  /* 271 */ OrtStatus *(*SetSymbolicDimensions)(OrtTensorTypeAndShapeInfo *info, const char **names,
                                                size_t count);
  KILN_PAD(272, 273);
  /* 274 */ OrtStatus *(*KernelContext_ParallelFor)(const OrtKernelContext *context,
                                                   void (*fn)(void *user, size_t i), size_t total,
                                                   size_t num_batch, void *user);
};

#define KILN_ORT_SLOT(member, index) \
  _Static_assert(offsetof(struct OrtApi, member) == (index) * sizeof(void *), #member " is not at " #index)
KILN_ORT_SLOT(CreateStatus, 0);
KILN_ORT_SLOT(GetErrorCode, 1);
KILN_ORT_SLOT(GetErrorMessage, 2);
KILN_ORT_SLOT(CreateCustomOpDomain, 26);
KILN_ORT_SLOT(CustomOpDomain_Add, 27);
KILN_ORT_SLOT(AddCustomOpDomain, 28);
KILN_ORT_SLOT(GetTensorMutableData, 51);
KILN_ORT_SLOT(CreateTensorTypeAndShapeInfo, 57);
KILN_ORT_SLOT(SetTensorElementType, 58);
KILN_ORT_SLOT(SetDimensions, 59);
KILN_ORT_SLOT(GetTensorElementType, 60);
KILN_ORT_SLOT(GetDimensionsCount, 61);
KILN_ORT_SLOT(GetDimensions, 62);
KILN_ORT_SLOT(GetSymbolicDimensions, 63);
KILN_ORT_SLOT(GetTensorShapeElementCount, 64);
KILN_ORT_SLOT(GetTensorTypeAndShape, 65);
KILN_ORT_SLOT(KernelContext_GetInput, 90);
KILN_ORT_SLOT(KernelContext_GetOutput, 91);
KILN_ORT_SLOT(ReleaseStatus, 93);
KILN_ORT_SLOT(ReleaseTensorTypeAndShapeInfo, 99);
KILN_ORT_SLOT(ReleaseCustomOpDomain, 101);
KILN_ORT_SLOT(KernelInfo_GetNodeName, 244);
KILN_ORT_SLOT(KernelInfoGetConstantInput_tensor, 249);
KILN_ORT_SLOT(ShapeInferContext_GetInputTypeShape, 268);
KILN_ORT_SLOT(ShapeInferContext_SetOutputTypeShape, 270);
KILN_ORT_SLOT(SetSymbolicDimensions, 271);
KILN_ORT_SLOT(KernelContext_ParallelFor, 274);

/* ---- OrtCustomOp, custom-op struct version 17 ---- */
struct OrtCustomOp {
  uint32_t version;
  /* version 1 */
  void *(*CreateKernel)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
  const char *(*GetName)(const struct OrtCustomOp *op);
  const char *(*GetExecutionProviderType)(const struct OrtCustomOp *op);
  KilnElemType (*GetInputType)(const struct OrtCustomOp *op, size_t index);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp *op);
  KilnElemType (*GetOutputType)(const struct OrtCustomOp *op, size_t index);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp *op);
  void (*KernelCompute)(void *kernel, OrtKernelContext *context);
  void (*KernelDestroy)(void *kernel);
  /* version 8 */
  int (*GetInputCharacteristic)(const struct OrtCustomOp *op, size_t index);
  int (*GetOutputCharacteristic)(const struct OrtCustomOp *op, size_t index);
  /* version 13 */
  int (*GetInputMemoryType)(const struct OrtCustomOp *op, size_t index);
  /* version 14 (read only for variadic inputs/outputs, which we do not declare) */
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp *op);
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *op);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *op);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *op);
  /* version 16: kernels that return a status instead of throwing (C cannot throw) */
  OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                               void **kernel);
  OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *context);
  /* version 17 */
  OrtStatus *(*InferOutputShapeFn)(const struct OrtCustomOp *op, OrtShapeInferContext *context);
  int (*GetStartVersion)(const struct OrtCustomOp *op);
  int (*GetEndVersion)(const struct OrtCustomOp *op);
};

#define KILN_CUSTOM_OP_VERSION 17u

#define KILN_OP_FIELD(member, index)                                                               \
  _Static_assert(offsetof(OrtCustomOp, member) == offsetof(OrtCustomOp, CreateKernel) +            \
                                                      ((index) - 1) * sizeof(void *),              \
                 #member " is not field " #index)
KILN_OP_FIELD(CreateKernel, 1);
KILN_OP_FIELD(KernelDestroy, 9);
KILN_OP_FIELD(GetInputMemoryType, 12);
KILN_OP_FIELD(CreateKernelV2, 17);
KILN_OP_FIELD(KernelComputeV2, 18);
KILN_OP_FIELD(InferOutputShapeFn, 19);
KILN_OP_FIELD(GetEndVersion, 21);

#ifdef __cplusplus
}
#endif
#endif /* KILN_ORT_ABI_H */
