// moe_routing C++ API: one declaration per op, plus the argument checks every
// backend shares. The functions below call through the dispatcher, so C++
// users get the same CPU / CUDA / Meta / Autograd behaviour as Python users.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <string>
#include <tuple>

namespace moe_routing {

// ---------------------------------------------------------------------------
// Ops (schemas in ops.cpp; semantics in reference.py and the README)
// ---------------------------------------------------------------------------

// Scores every token against every expert and picks its top-k experts.
// Returns (weights [T,k], experts [T,k] int64, scores [T,E]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> route(
    const at::Tensor& logits, int64_t k, const std::string& score = "softmax",
    std::optional<bool> normalize = std::nullopt,
    const std::optional<at::Tensor>& bias = std::nullopt, int64_t num_groups = 1,
    int64_t topk_groups = 1, double scale = 1.0, const std::string& group_score = "top2");

// Gradient of route with respect to logits. grad_scores is optional: without
// it the scores' gradient is zero, and no [T, E] zeros are made or read.
at::Tensor route_backward(const at::Tensor& grad_weights,
                          const std::optional<at::Tensor>& grad_scores,
                          const at::Tensor& weights, const at::Tensor& experts,
                          const at::Tensor& scores, const std::string& score, bool normalize,
                          double scale, at::ScalarType logits_dtype);

// Assigns each (token, choice) a row of an expert's buffer.
// Returns (slots [T,k] int64, load [E] int64, kept [E] int64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> plan(
    const at::Tensor& experts, int64_t num_experts, std::optional<int64_t> capacity = std::nullopt,
    const std::optional<at::Tensor>& weights = std::nullopt,
    const std::string& priority = "choice", const std::optional<at::Tensor>& mask = std::nullopt);

// Rows per expert: max(min_capacity, ceil(capacity_factor * T * k / E)), at most T.
int64_t capacity(int64_t num_tokens, int64_t num_experts, int64_t k, double capacity_factor,
                 int64_t min_capacity = 4);

// Moves token rows into expert buffer rows: [num_rows, H].
at::Tensor dispatch(const at::Tensor& x, const at::Tensor& slots, int64_t num_rows);
at::Tensor dispatch_backward(const at::Tensor& grad_out, const at::Tensor& slots);

// Weighted sum of each token's expert outputs: [T, H].
at::Tensor combine(const at::Tensor& expert_out, const at::Tensor& slots,
                   const at::Tensor& weights);
std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_y,
                                                    const at::Tensor& expert_out,
                                                    const at::Tensor& slots,
                                                    const at::Tensor& weights);

// Switch / GShard load-balancing loss, 1.0 under perfect balance; with
// seq_len, the DeepSeek-V3 sequence-wise form (averaged over sequences).
at::Tensor load_balancing_loss(const at::Tensor& scores, const at::Tensor& experts,
                               const std::optional<at::Tensor>& mask = std::nullopt,
                               std::optional<int64_t> seq_len = std::nullopt);
at::Tensor load_balancing_loss_backward(const at::Tensor& grad, const at::Tensor& scores,
                                        const at::Tensor& experts,
                                        const std::optional<at::Tensor>& mask,
                                        std::optional<int64_t> seq_len = std::nullopt);

// ST-MoE router z-loss: mean of logsumexp(logits)^2 over valid tokens.
at::Tensor z_loss(const at::Tensor& logits, const std::optional<at::Tensor>& mask = std::nullopt);
at::Tensor z_loss_backward(const at::Tensor& grad, const at::Tensor& logits,
                           const std::optional<at::Tensor>& mask);

// Expert Choice routing: each expert takes its top-C tokens.
// Returns (weights [E,C], tokens [E,C] int64, -1 where fewer than C tokens are valid).
std::tuple<at::Tensor, at::Tensor> expert_choice(const at::Tensor& scores, int64_t capacity,
                                                 const std::optional<at::Tensor>& mask = std::nullopt);
at::Tensor expert_choice_backward(const at::Tensor& grad_weights, const at::Tensor& tokens,
                                  int64_t num_tokens);

// Per-expert matrix product on the packed (dropless) layout: [R, H] x [E, H, F] -> [R, F].
at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& counts);
std::tuple<at::Tensor, at::Tensor> grouped_mm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& counts);

// SwiGLU of the experts' first product: h [R, 2F] (gate | up) ->
// silu(gate) * up [R, F], in one pass with float32 (float64) arithmetic.
at::Tensor swiglu(const at::Tensor& h);
// Gradient of swiglu with respect to h: [R, 2F].
at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& h);

// BASE layers: each valid token gets one expert, expert e exactly
// floor(V/E) + (e < V mod E) of the V valid tokens, by `iterations` auction
// rounds then an in-order fill. Returns experts [T] int64 (-1 for padding).
at::Tensor balanced_assignment(const at::Tensor& scores,
                               const std::optional<at::Tensor>& mask = std::nullopt,
                               int64_t iterations = 64, double epsilon = 1e-3);

// ---------------------------------------------------------------------------
// Shared argument checks: every backend (CPU, CUDA, Meta) calls these, so a
// bad input gets the same message whatever the device.
// ---------------------------------------------------------------------------
namespace detail {

enum class Score { Softmax, Sigmoid };
enum class Priority { Choice, Token, Score, Batch };

Score parse_score(const char* op, const std::string& score);
// How route scores a group: "top2" (sum of its two best, DeepSeek-V3) or
// "max" (its best, DeepSeek-V2's group_limited_greedy). True for "max".
bool parse_group_score(const char* op, const std::string& group_score);
Priority parse_priority(const char* op, const std::string& priority);

// normalize=None means "k > 1".
inline bool resolve_normalize(std::optional<bool> normalize, int64_t k) {
  return normalize.has_value() ? *normalize : k > 1;
}

inline std::optional<c10::SymInt> to_symint(std::optional<int64_t> value) {
  if (!value.has_value()) return std::nullopt;
  return c10::SymInt(*value);
}

// The padding mask as a bool pointer for a kernel (null when there is none);
// holder keeps its contiguous copy alive.
inline const bool* mask_data(const std::optional<at::Tensor>& mask, at::Tensor& holder) {
  if (!mask.has_value()) return nullptr;
  holder = mask->contiguous();
  return holder.const_data_ptr<bool>();
}

// Float type of weights and scores: float64 for float64 logits, else float32.
inline at::ScalarType router_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim,
               const char* shape);
void check_floating(const char* op, const char* arg, const at::Tensor& t);
void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType dtype);
void check_same_device(const char* op, const char* arg, const at::Tensor& t,
                       const at::Tensor& ref);
// mask: bool [T] on ref's device.
void check_mask(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& ref);

// Each check_<op>_args validates everything that can be known without
// reading tensor data (ranks, dtypes, devices, sizes, scalar arguments).
void check_route_args(const at::Tensor& logits, int64_t k, const std::optional<at::Tensor>& bias,
                      int64_t num_groups, int64_t topk_groups);
void check_route_backward_args(const at::Tensor& grad_weights,
                               const std::optional<at::Tensor>& grad_scores,
                               const at::Tensor& weights, const at::Tensor& experts,
                               const at::Tensor& scores, at::ScalarType logits_dtype);
void check_plan_args(const at::Tensor& experts, int64_t num_experts,
                     std::optional<c10::SymInt> capacity, const std::optional<at::Tensor>& weights,
                     Priority priority, const std::optional<at::Tensor>& mask);
void check_dispatch_args(const at::Tensor& x, const at::Tensor& slots, const c10::SymInt& num_rows);
void check_dispatch_backward_args(const at::Tensor& grad_out, const at::Tensor& slots);
void check_combine_args(const at::Tensor& expert_out, const at::Tensor& slots,
                        const at::Tensor& weights);
void check_combine_backward_args(const at::Tensor& grad_y, const at::Tensor& expert_out,
                                 const at::Tensor& slots, const at::Tensor& weights);
void check_load_balancing_args(const at::Tensor& scores, const at::Tensor& experts,
                               const std::optional<at::Tensor>& mask,
                               const std::optional<c10::SymInt>& seq_len);
void check_load_balancing_backward_args(const at::Tensor& grad, const at::Tensor& scores,
                                        const at::Tensor& experts,
                                        const std::optional<at::Tensor>& mask,
                                        const std::optional<c10::SymInt>& seq_len);
void check_expert_choice_args(const at::Tensor& scores, const c10::SymInt& capacity,
                              const std::optional<at::Tensor>& mask);
void check_expert_choice_backward_args(const at::Tensor& grad_weights, const at::Tensor& tokens,
                                       const c10::SymInt& num_tokens);
void check_grouped_mm_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& counts);
void check_grouped_mm_backward_args(const at::Tensor& grad, const at::Tensor& x,
                                    const at::Tensor& weight, const at::Tensor& counts);

void check_swiglu_args(const at::Tensor& h);
void check_swiglu_backward_args(const at::Tensor& grad, const at::Tensor& h);

void check_balanced_assignment_args(const at::Tensor& scores,
                                    const std::optional<at::Tensor>& mask, int64_t iterations,
                                    double epsilon);

// op is "moe_routing::z_loss" or "moe_routing::z_loss_backward".
void check_z_loss_args(const char* op, const at::Tensor& logits,
                       const std::optional<at::Tensor>& mask);
void check_z_loss_backward_args(const at::Tensor& grad, const at::Tensor& logits,
                                const std::optional<at::Tensor>& mask);

// What the CUDA route kernels hold in registers: E experts per lane group,
// k choices (one lane each), num_groups group flags in a 32-bit mask.
constexpr int64_t kCudaMaxExperts = 1024, kCudaMaxK = 32, kCudaMaxGroups = 32;
// op is "moe_routing::route" or "moe_routing::route_backward" (num_groups 1).
void check_route_cuda_limits(const char* op, int64_t E, int64_t k, int64_t num_groups);

// [R, H] view of expert outputs given as [R, H] or [E, C, H].
at::Tensor rows_view(const at::Tensor& expert_out);

}  // namespace detail
}  // namespace moe_routing
