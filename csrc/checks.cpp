// Argument checks shared by the CPU, CUDA and Meta kernels. They read only
// metadata (never tensor data), so they are safe on fake tensors and cost
// nothing on the GPU.
#include "moe_routing.h"

#include <cmath>
#include <limits>

namespace moe_routing::detail {

Score parse_score(const char* op, const std::string& score) {
  if (score == "softmax") return Score::Softmax;
  if (score == "sigmoid") return Score::Sigmoid;
  TORCH_CHECK(false, op, ": score must be \"softmax\" or \"sigmoid\", got \"", score, "\"");
}

bool parse_group_score(const char* op, const std::string& group_score) {
  if (group_score == "top2") return false;
  if (group_score == "max") return true;
  TORCH_CHECK(false, op, ": group_score must be \"top2\" or \"max\", got \"", group_score, "\"");
}

Priority parse_priority(const char* op, const std::string& priority) {
  if (priority == "choice") return Priority::Choice;
  if (priority == "token") return Priority::Token;
  if (priority == "score") return Priority::Score;
  if (priority == "batch") return Priority::Batch;
  TORCH_CHECK(false, op, ": priority must be \"choice\", \"token\", \"score\" or \"batch\", got \"",
              priority, "\"");
}

// dtypes as Python spells them (torch.int64, not c10's "Long"): the names
// users write and the contract uses.
std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(dtype);
  }
}

void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim,
               const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": ", arg, " must be ", dim, "-D ", shape, ", got shape ",
              t.sym_sizes());
}

void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", arg,
              " must be float32, float64, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
}

void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", arg, " must be ", dtype_name(dtype), ", got ",
              dtype_name(t.scalar_type()));
}

void check_same_device(const char* op, const char* arg, const at::Tensor& t,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " must be on ", ref.device(),
              " like the other inputs, got ", t.device());
}

void check_mask(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& ref) {
  if (!mask.has_value()) return;
  check_dim(op, "mask", *mask, 1, "[T]");
  check_dtype(op, "mask", *mask, at::kBool);
  check_same_device(op, "mask", *mask, ref);
  TORCH_CHECK(mask->sym_size(0) == ref.sym_size(0), op, ": mask must have T=", ref.sym_size(0),
              " entries, got ", mask->sym_size(0));
}

void check_route_args(const at::Tensor& logits, int64_t k, const std::optional<at::Tensor>& bias,
                      int64_t num_groups, int64_t topk_groups) {
  constexpr const char* op = "moe_routing::route";
  check_dim(op, "logits", logits, 2, "[T, E]");
  check_floating(op, "logits", logits);
  const c10::SymInt E = logits.sym_size(1);
  TORCH_CHECK(E >= 1, op, ": logits must have at least one expert column, got E=0");
  TORCH_CHECK(k >= 1 && E >= k, op, ": k must be in [1, E=", E, "], got ", k);
  if (bias.has_value()) {
    check_dim(op, "bias", *bias, 1, "[E]");
    check_floating(op, "bias", *bias);
    check_same_device(op, "bias", *bias, logits);
    TORCH_CHECK(bias->sym_size(0) == E, op, ": bias must have E=", E, " entries, got ",
                bias->sym_size(0));
  }
  TORCH_CHECK(num_groups >= 1 && E % num_groups == 0, op,
              ": num_groups must be >= 1 and divide E=", E, ", got ", num_groups);
  TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_groups, op,
              ": topk_groups must be in [1, num_groups=", num_groups, "], got ", topk_groups);
  const c10::SymInt selectable = E / num_groups * topk_groups;
  TORCH_CHECK(selectable >= k, op, ": k=", k, " exceeds the ", selectable,
              " experts of the topk_groups=", topk_groups, " selected groups");
}

void check_route_backward_args(const at::Tensor& grad_weights,
                               const std::optional<at::Tensor>& grad_scores,
                               const at::Tensor& weights, const at::Tensor& experts,
                               const at::Tensor& scores, at::ScalarType logits_dtype) {
  constexpr const char* op = "moe_routing::route_backward";
  TORCH_CHECK(at::isFloatingType(logits_dtype), op,
              ": logits_dtype must be a floating type, got ", dtype_name(logits_dtype));
  const auto dtype = router_dtype(logits_dtype);
  check_dim(op, "scores", scores, 2, "[T, E]");
  check_dtype(op, "scores", scores, dtype);
  check_dim(op, "experts", experts, 2, "[T, k]");
  check_dtype(op, "experts", experts, at::kLong);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_weights", &grad_weights},
                                {"weights", &weights}}) {
    check_dtype(op, name, *t, dtype);
    check_same_device(op, name, *t, scores);
    TORCH_CHECK(t->sym_sizes() == experts.sym_sizes(), op, ": ", name,
                " must have the shape of experts ", experts.sym_sizes(), ", got ", t->sym_sizes());
  }
  if (grad_scores.has_value()) {
    check_dtype(op, "grad_scores", *grad_scores, dtype);
    check_same_device(op, "grad_scores", *grad_scores, scores);
    TORCH_CHECK(grad_scores->sym_sizes() == scores.sym_sizes(), op,
                ": grad_scores must have the shape of scores ", scores.sym_sizes(), ", got ",
                grad_scores->sym_sizes());
  }
  check_same_device(op, "experts", experts, scores);
  TORCH_CHECK(experts.sym_size(0) == scores.sym_size(0), op, ": experts must have T=",
              scores.sym_size(0), " rows like scores, got ", experts.sym_size(0));
  // route never chooses more than E experts (CUDA's kernel has a lane per choice).
  TORCH_CHECK(experts.sym_size(1) <= scores.sym_size(1), op, ": experts must have at most E=",
              scores.sym_size(1), " columns (k <= E), got ", experts.sym_size(1));
}

void check_plan_args(const at::Tensor& experts, int64_t num_experts,
                     std::optional<c10::SymInt> capacity, const std::optional<at::Tensor>& weights,
                     Priority priority, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "moe_routing::plan";
  check_dim(op, "experts", experts, 2, "[T, k]");
  check_dtype(op, "experts", experts, at::kLong);
  // At most 2^31 - 1 experts on every device: the CUDA kernels index experts
  // with int, and a larger count only fails later in an allocation whose
  // message names neither the op nor the argument.
  TORCH_CHECK(num_experts >= 1 && num_experts <= std::numeric_limits<int32_t>::max(), op,
              ": num_experts must be in [1, 2^31 - 1], got ", num_experts);
  if (capacity.has_value()) {
    TORCH_CHECK(*capacity >= 0, op,
                ": capacity must be >= 0 (or None for dropless), got ", *capacity);
    // Slots are e * capacity + c: every one must fit in int64.
    TORCH_CHECK(*capacity <= std::numeric_limits<int64_t>::max() / num_experts, op,
                ": num_experts * capacity must fit in int64 (slots are e * capacity + c), got "
                "num_experts=", num_experts, " and capacity=", *capacity);
  }
  if (weights.has_value()) {
    check_floating(op, "weights", *weights);
    check_same_device(op, "weights", *weights, experts);
    TORCH_CHECK(weights->sym_sizes() == experts.sym_sizes(), op,
                ": weights must have the shape of experts ", experts.sym_sizes(), ", got ",
                weights->sym_sizes());
  }
  const bool by_weight = priority == Priority::Score || priority == Priority::Batch;
  TORCH_CHECK(weights.has_value() || !by_weight, op, ": priority \"",
              priority == Priority::Score ? "score" : "batch", "\" needs weights");
  check_mask(op, mask, experts);
}

void check_dispatch_args(const at::Tensor& x, const at::Tensor& slots,
                         const c10::SymInt& num_rows) {
  constexpr const char* op = "moe_routing::dispatch";
  check_dim(op, "x", x, 2, "[T, H]");
  check_floating(op, "x", x);
  check_dim(op, "slots", slots, 2, "[T, k]");
  check_dtype(op, "slots", slots, at::kLong);
  check_same_device(op, "slots", slots, x);
  TORCH_CHECK(slots.sym_size(0) == x.sym_size(0), op, ": slots must have T=", x.sym_size(0),
              " rows like x, got ", slots.sym_size(0));
  TORCH_CHECK(num_rows >= 0, op,
              ": num_rows must be >= 0, got ", num_rows);
}

void check_dispatch_backward_args(const at::Tensor& grad_out, const at::Tensor& slots) {
  constexpr const char* op = "moe_routing::dispatch_backward";
  check_dim(op, "grad_out", grad_out, 2, "[num_rows, H]");
  check_floating(op, "grad_out", grad_out);
  check_dim(op, "slots", slots, 2, "[T, k]");
  check_dtype(op, "slots", slots, at::kLong);
  check_same_device(op, "slots", slots, grad_out);
}

namespace {

void check_combine_inputs(const char* op, const at::Tensor& expert_out, const at::Tensor& slots,
                          const at::Tensor& weights) {
  TORCH_CHECK(expert_out.dim() == 2 || expert_out.dim() == 3, op,
              ": expert_out must be [num_rows, H] or [E, C, H], got shape ",
              expert_out.sym_sizes());
  check_floating(op, "expert_out", expert_out);
  check_dim(op, "slots", slots, 2, "[T, k]");
  check_dtype(op, "slots", slots, at::kLong);
  check_same_device(op, "slots", slots, expert_out);
  check_dim(op, "weights", weights, 2, "[T, k]");
  TORCH_CHECK(weights.scalar_type() == at::kFloat || weights.scalar_type() == at::kDouble, op,
              ": weights must be float32 or float64, got ", dtype_name(weights.scalar_type()));
  check_same_device(op, "weights", weights, expert_out);
  TORCH_CHECK(weights.sym_sizes() == slots.sym_sizes(), op,
              ": weights must have the shape of slots ", slots.sym_sizes(), ", got ",
              weights.sym_sizes());
}

}  // namespace

void check_combine_args(const at::Tensor& expert_out, const at::Tensor& slots,
                        const at::Tensor& weights) {
  check_combine_inputs("moe_routing::combine", expert_out, slots, weights);
}

void check_combine_backward_args(const at::Tensor& grad_y, const at::Tensor& expert_out,
                                 const at::Tensor& slots, const at::Tensor& weights) {
  constexpr const char* op = "moe_routing::combine_backward";
  check_combine_inputs(op, expert_out, slots, weights);
  check_dim(op, "grad_y", grad_y, 2, "[T, H]");
  check_dtype(op, "grad_y", grad_y, expert_out.scalar_type());
  check_same_device(op, "grad_y", grad_y, expert_out);
  TORCH_CHECK(grad_y.sym_size(0) == slots.sym_size(0) && grad_y.sym_size(1) == expert_out.sym_size(-1),
              op, ": grad_y must be [T=", slots.sym_size(0), ", H=", expert_out.sym_size(-1),
              "], got ", grad_y.sym_sizes());
}

namespace {

void check_load_balancing_inputs(const char* op, const at::Tensor& scores,
                                 const at::Tensor& experts, const std::optional<at::Tensor>& mask,
                                 const std::optional<c10::SymInt>& seq_len) {
  check_dim(op, "scores", scores, 2, "[T, E]");
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble, op,
              ": scores must be float32 or float64, got ", dtype_name(scores.scalar_type()));
  check_dim(op, "experts", experts, 2, "[T, k]");
  check_dtype(op, "experts", experts, at::kLong);
  check_same_device(op, "experts", experts, scores);
  TORCH_CHECK(experts.sym_size(0) == scores.sym_size(0), op, ": experts must have T=",
              scores.sym_size(0), " rows like scores, got ", experts.sym_size(0));
  TORCH_CHECK(experts.sym_size(1) >= 1, op, ": experts must have k >= 1 columns");
  check_mask(op, mask, scores);
  if (seq_len.has_value()) {
    TORCH_CHECK(*seq_len >= 1 && scores.sym_size(0) % *seq_len == 0, op,
                ": seq_len must be >= 1 and divide T=", scores.sym_size(0), ", got ", *seq_len);
  }
}

// grad: the scalar upstream gradient of a loss, on ref's device.
void check_scalar_grad(const char* op, const at::Tensor& grad, const at::Tensor& ref) {
  TORCH_CHECK(grad.dim() == 0, op, ": grad must be a scalar, got shape ", grad.sym_sizes());
  check_floating(op, "grad", grad);
  check_same_device(op, "grad", grad, ref);
}

}  // namespace

void check_load_balancing_args(const at::Tensor& scores, const at::Tensor& experts,
                               const std::optional<at::Tensor>& mask,
                               const std::optional<c10::SymInt>& seq_len) {
  check_load_balancing_inputs("moe_routing::load_balancing_loss", scores, experts, mask, seq_len);
}

void check_load_balancing_backward_args(const at::Tensor& grad, const at::Tensor& scores,
                                        const at::Tensor& experts,
                                        const std::optional<at::Tensor>& mask,
                                        const std::optional<c10::SymInt>& seq_len) {
  constexpr const char* op = "moe_routing::load_balancing_loss_backward";
  check_load_balancing_inputs(op, scores, experts, mask, seq_len);
  check_scalar_grad(op, grad, scores);
}

void check_expert_choice_args(const at::Tensor& scores, const c10::SymInt& capacity,
                              const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "moe_routing::expert_choice";
  check_dim(op, "scores", scores, 2, "[T, E]");
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble, op,
              ": scores must be float32 or float64, got ", dtype_name(scores.scalar_type()));
  TORCH_CHECK(capacity >= 0, op, ": capacity must be >= 0, got ", capacity);
  check_mask(op, mask, scores);
}

void check_expert_choice_backward_args(const at::Tensor& grad_weights, const at::Tensor& tokens,
                                       const c10::SymInt& num_tokens) {
  constexpr const char* op = "moe_routing::expert_choice_backward";
  check_dim(op, "grad_weights", grad_weights, 2, "[E, C]");
  TORCH_CHECK(grad_weights.scalar_type() == at::kFloat || grad_weights.scalar_type() == at::kDouble,
              op, ": grad_weights must be float32 or float64, got ",
              dtype_name(grad_weights.scalar_type()));
  check_dim(op, "tokens", tokens, 2, "[E, C]");
  check_dtype(op, "tokens", tokens, at::kLong);
  check_same_device(op, "tokens", tokens, grad_weights);
  TORCH_CHECK(tokens.sym_sizes() == grad_weights.sym_sizes(), op,
              ": tokens must have the shape of grad_weights ", grad_weights.sym_sizes(), ", got ",
              tokens.sym_sizes());
  TORCH_CHECK(num_tokens >= 0, op, ": num_tokens must be >= 0, got ", num_tokens);
}

namespace {

void check_grouped_mm_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& counts) {
  check_dim(op, "x", x, 2, "[R, H]");
  check_floating(op, "x", x);
  check_dim(op, "weight", weight, 3, "[E, H, F]");
  check_dtype(op, "weight", weight, x.scalar_type());
  check_same_device(op, "weight", weight, x);
  TORCH_CHECK(weight.sym_size(1) == x.sym_size(1), op, ": weight must be [E, H=", x.sym_size(1),
              ", F], got ", weight.sym_sizes());
  check_dim(op, "counts", counts, 1, "[E]");
  check_dtype(op, "counts", counts, at::kLong);
  check_same_device(op, "counts", counts, x);
  TORCH_CHECK(counts.sym_size(0) == weight.sym_size(0), op, ": counts must have E=",
              weight.sym_size(0), " entries, got ", counts.sym_size(0));
}

}  // namespace

void check_grouped_mm_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& counts) {
  check_grouped_mm_inputs("moe_routing::grouped_mm", x, weight, counts);
}

namespace {

void check_swiglu_input(const char* op, const at::Tensor& h) {
  check_dim(op, "h", h, 2, "[R, 2F]");
  check_floating(op, "h", h);
  TORCH_CHECK(h.sym_size(1) % 2 == 0, op,
              ": h must be [R, 2F] (gate then up), an even number of columns, got ", h.sym_sizes());
}

}  // namespace

void check_swiglu_args(const at::Tensor& h) { check_swiglu_input("moe_routing::swiglu", h); }

void check_swiglu_backward_args(const at::Tensor& grad, const at::Tensor& h) {
  constexpr const char* op = "moe_routing::swiglu_backward";
  check_swiglu_input(op, h);
  check_dtype(op, "grad", grad, h.scalar_type());
  check_same_device(op, "grad", grad, h);
  TORCH_CHECK(grad.dim() == 2 && grad.sym_size(0) == h.sym_size(0) &&
                  grad.sym_size(1) * 2 == h.sym_size(1),
              op, ": grad must be [R=", h.sym_size(0), ", F=", h.sym_size(1) / 2, "], got ",
              grad.sym_sizes());
}

void check_balanced_assignment_args(const at::Tensor& scores,
                                    const std::optional<at::Tensor>& mask, int64_t iterations,
                                    double epsilon) {
  constexpr const char* op = "moe_routing::balanced_assignment";
  check_dim(op, "scores", scores, 2, "[T, E]");
  check_floating(op, "scores", scores);
  TORCH_CHECK(scores.sym_size(1) >= 1, op, ": scores must have at least one expert column, got E=0");
  TORCH_CHECK(iterations >= 0, op, ": iterations must be >= 0, got ", iterations);
  TORCH_CHECK(epsilon > 0 && std::isfinite(epsilon), op, ": epsilon must be > 0 and finite, got ",
              epsilon);
  check_mask(op, mask, scores);
}

void check_z_loss_args(const char* op, const at::Tensor& logits,
                       const std::optional<at::Tensor>& mask) {
  check_dim(op, "logits", logits, 2, "[T, E]");
  check_floating(op, "logits", logits);
  TORCH_CHECK(logits.sym_size(1) >= 1, op, ": logits must have at least one expert column, got E=0");
  check_mask(op, mask, logits);
}

void check_z_loss_backward_args(const at::Tensor& grad, const at::Tensor& logits,
                                const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "moe_routing::z_loss_backward";
  check_z_loss_args(op, logits, mask);
  check_scalar_grad(op, grad, logits);
}

void check_route_cuda_limits(const char* op, int64_t E, int64_t k, int64_t num_groups) {
  TORCH_CHECK(E <= kCudaMaxExperts, op, ": on CUDA E must be <= ", kCudaMaxExperts, ", got ", E);
  TORCH_CHECK(k <= kCudaMaxK, op, ": on CUDA k must be <= ", kCudaMaxK, ", got ", k);
  TORCH_CHECK(num_groups <= kCudaMaxGroups, op, ": on CUDA num_groups must be <= ",
              kCudaMaxGroups, ", got ", num_groups);
}

at::Tensor rows_view(const at::Tensor& expert_out) {
  return expert_out.dim() == 2 ? expert_out : expert_out.flatten(0, 1);
}

void check_grouped_mm_backward_args(const at::Tensor& grad, const at::Tensor& x,
                                    const at::Tensor& weight, const at::Tensor& counts) {
  constexpr const char* op = "moe_routing::grouped_mm_backward";
  check_grouped_mm_inputs(op, x, weight, counts);
  check_dtype(op, "grad", grad, x.scalar_type());
  check_same_device(op, "grad", grad, x);
  TORCH_CHECK(grad.dim() == 2 && grad.sym_size(0) == x.sym_size(0) &&
                  grad.sym_size(1) == weight.sym_size(2),
              op, ": grad must be [R=", x.sym_size(0), ", F=", weight.sym_size(2), "], got ",
              grad.sym_sizes());
}

}  // namespace moe_routing::detail
