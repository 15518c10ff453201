/* modelkiln's ONNX Runtime custom-op library: ai.modelkiln::LookupTable.
 *
 *   Y = LookupTable(X, table):  Y[i] = table[(uint8_t)X[i]]
 *   X: uint8 or int8, any shape (rank 0 and empty included); table: 256 uint8 or int8 elements;
 *   Y: X's shape, the table's element type. An int8 x indexes by its byte (-1 -> 255).
 *
 * ONNX Runtime dlopens this file and calls RegisterCustomOps (the only exported symbol besides
 * KilnKernelsIsa, which tells tests and benchmarks which code path runs). Plain C, no Python.
 *
 * One OrtCustomOp per (X type, table type) pair, all named LookupTable: ONNX Runtime then builds
 * one schema whose output type follows the matching kernel, so the node's output type is known at
 * load time and DequantizeLinear / QDQ fusions downstream see an ordinary uint8 or int8 tensor.
 * InferOutputShapeFn gives Y X's shape for the same reason.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lut.h"
#include "ort_abi.h"

#define KILN_EXPORT __attribute__((visibility("default")))
#define KILN_DOMAIN "ai.modelkiln"
#define KILN_OP "LookupTable"
#define KILN_TABLE_SIZE 256u
#define KILN_MAX_RANK 64u

/* ---------------------------------------------------------------- settings (read once) ---- */

/* Tensors at least this large are split across ONNX Runtime's intra-op threads. */
#define KILN_PARALLEL_MIN_BYTES ((size_t)1 << 17)
/* Bytes per ParallelFor task (a multiple of 64: every task but the last runs whole vectors). */
#define KILN_PARALLEL_CHUNK ((size_t)1 << 16)

typedef struct KilnSettings {
  const KilnLutPath *path; /* NULL: KILN_KERNELS_ISA named a path this CPU lacks */
  char error[256];
  int parallel; /* KILN_KERNELS_THREADS: 0 never splits a tensor across threads */
} KilnSettings;

static KilnSettings g_settings;
static const OrtApi *g_api;  /* GetApi(KILN_ORT_API_VERSION), set on first registration */
static int g_settings_state; /* 0 unset, 1 being set, 2 set; accessed with __atomic builtins */

static void read_settings(KilnSettings *s) {
  memset(s, 0, sizeof *s);
  const char *isa = getenv("KILN_KERNELS_ISA");
  s->path = kiln_lut_find(isa);
  if (s->path == NULL) {
    if (isa != NULL && !kiln_lut_known(isa) && strcmp(isa, "auto") != 0)
      snprintf(s->error, sizeof s->error,
               "modelkiln kernels: KILN_KERNELS_ISA=%.40s is not a code path (use scalar, avx2, "
               "avx512vbmi or auto)",
               isa);
    else
      snprintf(s->error, sizeof s->error,
               "modelkiln kernels: KILN_KERNELS_ISA=%.40s was requested but this CPU (or this build) "
               "cannot run it",
               isa ? isa : "auto");
  }
  const char *threads = getenv("KILN_KERNELS_THREADS");
  s->parallel = !(threads != NULL && strcmp(threads, "0") == 0);
}

/* The settings, read from the environment once per process (the first caller reads them; a
 * concurrent first caller waits the microseconds that takes). */
static const KilnSettings *settings(void) {
  int state = __atomic_load_n(&g_settings_state, __ATOMIC_ACQUIRE);
  if (state == 2) return &g_settings;
  int expected = 0;
  if (__atomic_compare_exchange_n(&g_settings_state, &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    read_settings(&g_settings);
    __atomic_store_n(&g_settings_state, 2, __ATOMIC_RELEASE);
  } else {
    while (__atomic_load_n(&g_settings_state, __ATOMIC_ACQUIRE) != 2) {
    }
  }
  return &g_settings;
}

/* The code path LookupTable runs ("scalar", "avx2", "avx512vbmi"), or NULL when KILN_KERNELS_ISA
 * asked for one this CPU lacks. For tests and benchmarks (ctypes); ONNX Runtime never calls it. */
KILN_EXPORT const char *KilnKernelsIsa(void) {
  const KilnLutPath *p = settings()->path;
  return p ? p->name : NULL;
}

/* ---------------------------------------------------------------- the op variants ---- */

typedef struct KilnLookupOp {
  OrtCustomOp op; /* first member: ONNX Runtime hands back &op, we cast to the container */
  KilnElemType x_type;
  KilnElemType table_type;
} KilnLookupOp;

typedef struct KilnKernel {
  const OrtApi *api;
  KilnElemType x_type;
  KilnElemType table_type;
  char node[128]; /* node name, for error messages */
} KilnKernel;

static const char *type_name(KilnElemType t) {
  switch (t) {
    case KILN_ELEM_UINT8:
      return "uint8";
    case KILN_ELEM_INT8:
      return "int8";
    case KILN_ELEM_FLOAT:
      return "float";
    default:
      return "a non-8-bit type";
  }
}

__attribute__((format(printf, 4, 5))) static OrtStatus *fail(const OrtApi *api, KilnOrtErrorCode code,
                                                               const char *node, const char *fmt, ...) {
  char what[256], msg[448];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  snprintf(msg, sizeof msg, "%s node '%s' (domain %s): %s", KILN_OP, node[0] ? node : "<unnamed>", KILN_DOMAIN,
           what);
  return api->CreateStatus(code, msg);
}

static const char *op_name(const OrtCustomOp *op) {
  (void)op;
  return KILN_OP;
}
static const char *op_provider(const OrtCustomOp *op) {
  (void)op;
  return NULL; /* NULL: the CPU execution provider */
}
static size_t op_input_count(const OrtCustomOp *op) {
  (void)op;
  return 2;
}
static size_t op_output_count(const OrtCustomOp *op) {
  (void)op;
  return 1;
}
static KilnElemType op_input_type(const OrtCustomOp *op, size_t index) {
  const KilnLookupOp *k = (const KilnLookupOp *)op;
  return index == 0 ? k->x_type : k->table_type;
}
static KilnElemType op_output_type(const OrtCustomOp *op, size_t index) {
  (void)index;
  return ((const KilnLookupOp *)op)->table_type;
}
static int op_required(const OrtCustomOp *op, size_t index) {
  (void)op;
  (void)index;
  return KILN_ORT_IO_REQUIRED;
}
static int op_memory_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  (void)index;
  return KILN_ORT_MEM_DEFAULT;
}
static int op_variadic_arity(const OrtCustomOp *op) {
  (void)op;
  return 1;
}
static int op_variadic_homogeneous(const OrtCustomOp *op) {
  (void)op;
  return 1;
}
static int op_start_version(const OrtCustomOp *op) {
  (void)op;
  return 1;
}
static int op_end_version(const OrtCustomOp *op) {
  (void)op;
  return 1000; /* the range ONNX Runtime gives a custom domain */
}

/* Element count, element type and (when rank is asked for) dims of a tensor; a status on failure. */
static OrtStatus *element_count(const OrtApi *api, const OrtValue *v, size_t *count, KilnElemType *type,
                                size_t *rank, int64_t *dims) {
  OrtTensorTypeAndShapeInfo *info = NULL;
  OrtStatus *st = api->GetTensorTypeAndShape(v, &info);
  if (st) return st;
  st = api->GetTensorShapeElementCount(info, count);
  if (!st && type) st = api->GetTensorElementType(info, type);
  if (!st && rank) {
    st = api->GetDimensionsCount(info, rank);
    if (!st && *rank > KILN_MAX_RANK)
      st = api->CreateStatus(KILN_ORT_INVALID_ARGUMENT, "LookupTable: input rank above 64 is not supported");
    if (!st && *rank > 0) st = api->GetDimensions(info, dims, *rank);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

static OrtStatus *check_table(const OrtApi *api, const KilnKernel *k, size_t count, KilnElemType type) {
  if (type != k->table_type)
    return fail(api, KILN_ORT_INVALID_ARGUMENT, k->node, "table must be %s, got %s", type_name(k->table_type),
                type_name(type));
  if (count != KILN_TABLE_SIZE)
    return fail(api, KILN_ORT_INVALID_ARGUMENT, k->node,
                "table must have exactly 256 elements (one per byte value), got %zu", count);
  return NULL;
}

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                void **out) {
  const KilnLookupOp *lop = (const KilnLookupOp *)op;
  *out = NULL;
  KilnKernel *k = (KilnKernel *)calloc(1, sizeof *k);
  if (!k) return api->CreateStatus(KILN_ORT_FAIL, "LookupTable: out of memory");
  k->api = api;
  k->x_type = lop->x_type;
  k->table_type = lop->table_type;

  /* The node's name, for messages (cut to fit; a failure leaves it empty). */
  size_t size = 0;
  OrtStatus *st = api->KernelInfo_GetNodeName(info, NULL, &size);
  char *name = (!st && size > 0) ? (char *)malloc(size) : NULL;
  if (name) {
    st = api->KernelInfo_GetNodeName(info, name, &size);
    if (!st) snprintf(k->node, sizeof k->node, "%s", name);
    free(name);
  }
  if (st) api->ReleaseStatus(st);

  /* A constant table (an initializer, the usual case) is checked once, at session load. */
  int is_constant = 0;
  const OrtValue *table = NULL;
  st = api->KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &table);
  if (!st && is_constant && table) {
    size_t count = 0;
    KilnElemType type = KILN_ELEM_UNDEFINED;
    st = element_count(api, table, &count, &type, NULL, NULL);
    if (!st) st = check_table(api, k, count, type);
  }
  if (st) {
    free(k);
    return st;
  }
  *out = k;
  return NULL;
}

static void destroy_kernel(void *kernel) { free(kernel); }

typedef struct KilnJob {
  kiln_lut_fn fn;
  const uint8_t *x;
  uint8_t *y;
  size_t n;
  const uint8_t *table;
} KilnJob;

static void run_chunk(void *user, size_t i) {
  const KilnJob *job = (const KilnJob *)user;
  size_t start = i * KILN_PARALLEL_CHUNK;
  size_t len = job->n - start < KILN_PARALLEL_CHUNK ? job->n - start : KILN_PARALLEL_CHUNK;
  job->fn(job->x + start, job->y + start, len, job->table);
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const KilnKernel *k = (const KilnKernel *)kernel;
  const OrtApi *api = k->api;
  const KilnSettings *s = settings();
  if (s->path == NULL) return api->CreateStatus(KILN_ORT_FAIL, s->error);

  const OrtValue *xv = NULL, *tv = NULL;
  OrtStatus *st = api->KernelContext_GetInput(ctx, 0, &xv);
  if (!st) st = api->KernelContext_GetInput(ctx, 1, &tv);
  if (st) return st;
  if (!xv || !tv) return fail(api, KILN_ORT_INVALID_ARGUMENT, k->node, "missing input");

  size_t t_count = 0;
  KilnElemType t_type = KILN_ELEM_UNDEFINED;
  st = element_count(api, tv, &t_count, &t_type, NULL, NULL);
  if (!st) st = check_table(api, k, t_count, t_type);
  if (st) return st;

  size_t n = 0, rank = 0;
  int64_t dims[KILN_MAX_RANK];
  KilnElemType x_type = KILN_ELEM_UNDEFINED;
  st = element_count(api, xv, &n, &x_type, &rank, dims);
  if (st) return st;
  if (x_type != k->x_type)
    return fail(api, KILN_ORT_INVALID_ARGUMENT, k->node, "X must be %s, got %s", type_name(k->x_type),
                type_name(x_type));

  OrtValue *yv = NULL;
  st = api->KernelContext_GetOutput(ctx, 0, dims, rank, &yv);
  if (st) return st;
  if (n == 0) return NULL;

  void *x = NULL, *t = NULL, *y = NULL;
  st = api->GetTensorMutableData((OrtValue *)xv, &x);
  if (!st) st = api->GetTensorMutableData((OrtValue *)tv, &t);
  if (!st) st = api->GetTensorMutableData(yv, &y);
  if (st) return st;
  if (!x || !t || !y) return fail(api, KILN_ORT_FAIL, k->node, "tensor without data");

  KilnJob job = {s->path->fn, (const uint8_t *)x, (uint8_t *)y, n, (const uint8_t *)t};
  if (s->parallel && n >= KILN_PARALLEL_MIN_BYTES) {
    size_t chunks = (n + KILN_PARALLEL_CHUNK - 1) / KILN_PARALLEL_CHUNK;
    return api->KernelContext_ParallelFor(ctx, run_chunk, chunks, 0, &job);
  }
  job.fn(job.x, job.y, job.n, job.table);
  return NULL;
}

/* Y: X's shape and the table's element type. Only a fully known shape is passed on (each dim a
 * number or a named symbol): ONNX Runtime shows an absent shape as rank 0 and an unnamed unknown
 * dim as -1, and passing either on would state a shape the model does not have.
 *
 * The info handed to SetOutputTypeShape is built here, not X's own: ONNX Runtime 1.32 takes the
 * element type from it too, and X's type is not Y's when X and the table differ (uint8 -> int8).
 * ONNX Runtime calls this for the first registered variant whatever the node's types, so the
 * table's type is read from the node's input, not from `op`. */
static OrtStatus *infer_shape_steps(const OrtApi *api, OrtShapeInferContext *ctx) {
  OrtTensorTypeAndShapeInfo *x_info = NULL, *t_info = NULL; /* owned by ctx */
  OrtStatus *st = api->ShapeInferContext_GetInputTypeShape(ctx, 0, &x_info);
  if (!st) st = api->ShapeInferContext_GetInputTypeShape(ctx, 1, &t_info);
  KilnElemType y_type = KILN_ELEM_UNDEFINED;
  if (!st) st = api->GetTensorElementType(t_info, &y_type);
  size_t rank = 0;
  if (!st) st = api->GetDimensionsCount(x_info, &rank);
  if (st) return st;
  if ((y_type != KILN_ELEM_UINT8 && y_type != KILN_ELEM_INT8) || rank == 0 || rank > KILN_MAX_RANK) return NULL;

  int64_t dims[KILN_MAX_RANK];
  const char *names[KILN_MAX_RANK];
  st = api->GetDimensions(x_info, dims, rank);
  if (!st) st = api->GetSymbolicDimensions(x_info, names, rank);
  if (st) return st;
  for (size_t i = 0; i < rank; i++) {
    if (names[i] == NULL) names[i] = "";
    if (dims[i] < 0 && names[i][0] == '\0') return NULL;
  }
  OrtTensorTypeAndShapeInfo *y_info = NULL;
  st = api->CreateTensorTypeAndShapeInfo(&y_info);
  if (st) return st;
  st = api->SetTensorElementType(y_info, y_type);
  if (!st) st = api->SetDimensions(y_info, dims, rank);
  if (!st) st = api->SetSymbolicDimensions(y_info, names, rank);
  if (!st) st = api->ShapeInferContext_SetOutputTypeShape(ctx, 0, y_info);
  api->ReleaseTensorTypeAndShapeInfo(y_info);
  return st;
}

static OrtStatus *infer_shape(const OrtCustomOp *op, OrtShapeInferContext *ctx) {
  (void)op;
  const OrtApi *api = __atomic_load_n(&g_api, __ATOMIC_ACQUIRE);
  if (!api) return NULL;
  /* Shape inference is advice: a failure leaves Y's shape unknown, never fails the load (and
   * ONNX Runtime does not release a status returned from here). */
  OrtStatus *st = infer_shape_steps(api, ctx);
  if (st) api->ReleaseStatus(st);
  return NULL;
}

#define KILN_LOOKUP_OP(xt, tt)                                                                     \
  {                                                                                                \
    .op =                                                                                          \
        {                                                                                          \
            .version = KILN_CUSTOM_OP_VERSION,                                                     \
            .CreateKernel = NULL, /* CreateKernelV2 is used from version 16 */                     \
            .GetName = op_name,                                                                    \
            .GetExecutionProviderType = op_provider,                                               \
            .GetInputType = op_input_type,                                                         \
            .GetInputTypeCount = op_input_count,                                                   \
            .GetOutputType = op_output_type,                                                       \
            .GetOutputTypeCount = op_output_count,                                                 \
            .KernelCompute = NULL, /* KernelComputeV2 is used from version 16 */                   \
            .KernelDestroy = destroy_kernel,                                                       \
            .GetInputCharacteristic = op_required,                                                 \
            .GetOutputCharacteristic = op_required,                                                \
            .GetInputMemoryType = op_memory_type,                                                  \
            .GetVariadicInputMinArity = op_variadic_arity,                                         \
            .GetVariadicInputHomogeneity = op_variadic_homogeneous,                                \
            .GetVariadicOutputMinArity = op_variadic_arity,                                        \
            .GetVariadicOutputHomogeneity = op_variadic_homogeneous,                               \
            .CreateKernelV2 = create_kernel,                                                       \
            .KernelComputeV2 = compute,                                                            \
            .InferOutputShapeFn = infer_shape,                                                     \
            .GetStartVersion = op_start_version,                                                   \
            .GetEndVersion = op_end_version,                                                       \
        },                                                                                         \
    .x_type = (xt), .table_type = (tt),                                                            \
  }

static KilnLookupOp g_ops[4] = {
    KILN_LOOKUP_OP(KILN_ELEM_UINT8, KILN_ELEM_UINT8),
    KILN_LOOKUP_OP(KILN_ELEM_INT8, KILN_ELEM_INT8),
    KILN_LOOKUP_OP(KILN_ELEM_UINT8, KILN_ELEM_INT8),
    KILN_LOOKUP_OP(KILN_ELEM_INT8, KILN_ELEM_UINT8),
};

/* ---------------------------------------------------------------- registration ---- */

static OrtCustomOpDomain *g_domain; /* one domain for every session, alive for the process */

static OrtStatus *make_domain(const OrtApi *api, OrtCustomOpDomain **out) {
  OrtCustomOpDomain *domain = NULL;
  OrtStatus *st = api->CreateCustomOpDomain(KILN_DOMAIN, &domain);
  for (size_t i = 0; !st && i < sizeof g_ops / sizeof g_ops[0]; i++)
    st = api->CustomOpDomain_Add(domain, &g_ops[i].op);
  if (st) {
    if (domain) api->ReleaseCustomOpDomain(domain);
    return st;
  }
  *out = domain;
  return NULL;
}

KILN_EXPORT OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  const OrtApi *api = base ? base->GetApi(KILN_ORT_API_VERSION) : NULL;
  if (!api) return NULL; /* ONNX Runtime older than 1.17: nothing we can report through */
  const KilnSettings *s = settings();
  if (s->path == NULL) return api->CreateStatus(KILN_ORT_INVALID_ARGUMENT, s->error);
  __atomic_store_n(&g_api, api, __ATOMIC_RELEASE);

  OrtCustomOpDomain *domain = __atomic_load_n(&g_domain, __ATOMIC_ACQUIRE);
  if (!domain) {
    OrtStatus *st = make_domain(api, &domain);
    if (st) return st;
    OrtCustomOpDomain *expected = NULL;
    if (!__atomic_compare_exchange_n(&g_domain, &expected, domain, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
      api->ReleaseCustomOpDomain(domain); /* another thread published one first */
      domain = expected;
    }
  }
  return api->AddCustomOpDomain(options, domain);
}
