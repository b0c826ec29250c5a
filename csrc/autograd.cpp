// Autograd kernels: each forward redispatches below autograd to the backend
// kernel, each backward calls the op's *_backward op through the dispatcher,
// so compiled graphs and C++ users see the same backward ops.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <functional>

#include "moe_routing.h"

namespace moe_routing::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <class Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

class RouteFunction : public torch::autograd::Function<RouteFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t k,
                               c10::string_view score, std::optional<bool> normalize,
                               const std::optional<at::Tensor>& bias, int64_t num_groups,
                               int64_t topk_groups, double scale, c10::string_view group_score) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [weights, experts, scores] =
        moe_routing::route(logits, k, std::string(score), normalize, bias, num_groups,
                           topk_groups, scale, std::string(group_score));
    ctx->mark_non_differentiable({experts});
    // An unused output's gradient stays undefined instead of becoming zeros:
    // a [T, E] zero grad_scores would be written and read for nothing.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({weights, experts, scores});
    ctx->saved_data["score"] = std::string(score);
    ctx->saved_data["normalize"] = detail::resolve_normalize(normalize, k);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["logits_dtype"] = static_cast<int64_t>(logits.scalar_type());
    return {weights, experts, scores};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined() && !grads[2].defined()) return variable_list(9);
    const at::Tensor grad_weights = grads[0].defined() ? grads[0] : at::zeros_like(saved[0]);
    const std::optional<at::Tensor> grad_scores =
        grads[2].defined() ? std::optional<at::Tensor>(grads[2]) : std::nullopt;
    const at::Tensor grad_logits = route_backward(
        grad_weights, grad_scores, saved[0], saved[1], saved[2],
        ctx->saved_data["score"].toStringRef(), ctx->saved_data["normalize"].toBool(),
        ctx->saved_data["scale"].toDouble(),
        static_cast<at::ScalarType>(ctx->saved_data["logits_dtype"].toInt()));
    // logits, k, score, normalize, bias (selection only: no gradient), groups,
    // scale, group_score.
    return {grad_logits, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

class DispatchFunction : public torch::autograd::Function<DispatchFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& slots,
                            c10::SymInt num_rows) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto dispatch_op = op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>(
        "moe_routing::dispatch");
    ctx->save_for_backward({slots});
    return dispatch_op.call(x, slots, std::move(num_rows));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {dispatch_backward(grads[0], ctx->get_saved_variables()[0]), {}, {}};
  }
};

class CombineFunction : public torch::autograd::Function<CombineFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& expert_out,
                            const at::Tensor& slots, const at::Tensor& weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({expert_out, slots, weights});
    return combine(expert_out, slots, weights);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_expert_out, grad_weights] = combine_backward(grads[0], saved[0], saved[1], saved[2]);
    return {grad_expert_out, {}, grad_weights};
  }
};

class LoadBalancingLossFunction : public torch::autograd::Function<LoadBalancingLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& scores,
                            const at::Tensor& experts, const std::optional<at::Tensor>& mask,
                            std::optional<c10::SymInt> seq_len) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto loss_op =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                      std::optional<c10::SymInt>)>("moe_routing::load_balancing_loss");
    ctx->save_for_backward({scores, experts, mask.value_or(at::Tensor())});
    if (seq_len.has_value()) ctx->saved_data["seq_len"] = *seq_len;
    return loss_op.call(scores, experts, mask, seq_len);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto backward_op = op<at::Tensor(const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const std::optional<at::Tensor>&,
                                            std::optional<c10::SymInt>)>(
        "moe_routing::load_balancing_loss_backward");
    const auto saved = ctx->get_saved_variables();
    std::optional<at::Tensor> mask;
    if (saved[2].defined()) mask = saved[2];
    std::optional<c10::SymInt> seq_len;
    if (ctx->saved_data.count("seq_len")) seq_len = ctx->saved_data["seq_len"].toSymInt();
    return {backward_op.call(grads[0], saved[0], saved[1], mask, seq_len), {}, {}, {}};
  }
};

class ExpertChoiceFunction : public torch::autograd::Function<ExpertChoiceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& scores,
                               c10::SymInt capacity, const std::optional<at::Tensor>& mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto choice_op = op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, c10::SymInt, const std::optional<at::Tensor>&)>(
        "moe_routing::expert_choice");
    auto [weights, tokens] = choice_op.call(scores, std::move(capacity), mask);
    ctx->mark_non_differentiable({tokens});
    ctx->save_for_backward({tokens});
    ctx->saved_data["num_tokens"] = scores.sym_size(0);
    return {weights, tokens};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto backward_op = op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>(
        "moe_routing::expert_choice_backward");
    return {backward_op.call(grads[0], ctx->get_saved_variables()[0],
                             ctx->saved_data["num_tokens"].toSymInt()),
            {}, {}};
  }
};

class GroupedMmFunction : public torch::autograd::Function<GroupedMmFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& counts) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight, counts});
    return grouped_mm(x, weight, counts);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_x, grad_weight] = grouped_mm_backward(grads[0], saved[0], saved[1], saved[2]);
    return {grad_x, grad_weight, {}};
  }
};

class SwigluFunction : public torch::autograd::Function<SwigluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({h});  // h only: silu(gate) is recomputed in backward
    return swiglu(h);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {swiglu_backward(grads[0], ctx->get_saved_variables()[0])};
  }
};

class ZLossFunction : public torch::autograd::Function<ZLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits,
                            const std::optional<at::Tensor>& mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({logits, mask.value_or(at::Tensor())});
    return z_loss(logits, mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    std::optional<at::Tensor> mask;
    if (saved[1].defined()) mask = saved[1];
    return {z_loss_backward(grads[0], saved[0], mask), {}};
  }
};

// dispatch_backward is a combine with unit weights: linear in grad_out, so
// its derivative is a dispatch of the incoming gradient, and dispatch is
// differentiable any number of times.
class DispatchBackwardFunction : public torch::autograd::Function<DispatchBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_out,
                            const at::Tensor& slots) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({slots});
    ctx->saved_data["num_rows"] = grad_out.sym_size(0);
    return dispatch_backward(grad_out, slots);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto dispatch_op = op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>(
        "moe_routing::dispatch");
    return {dispatch_op.call(grads[0], ctx->get_saved_variables()[0],
                             ctx->saved_data["num_rows"].toSymInt()),
            {}};
  }
};

// The other *_backward ops are differentiable only so that differentiating
// their results says so: a second backward through them raises instead of
// silently giving zeros (as an op without an Autograd kernel would).
// `inputs` are the op's floating-point tensors; `run` computes the op.
class NotTwiceDifferentiable : public torch::autograd::Function<NotTwiceDifferentiable> {
 public:
  static variable_list forward(AutogradContext* ctx, const std::string& name,
                               at::TensorList inputs, const std::function<variable_list()>& run) {
    (void)inputs;
    ctx->saved_data["name"] = name;
    at::AutoDispatchBelowADInplaceOrView guard;
    return run();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    (void)grads;
    TORCH_CHECK(false, ctx->saved_data["name"].toStringRef(),
                ": double backward is not supported");
    return {};
  }
};

at::Tensor route_backward_autograd(const at::Tensor& grad_weights,
                                   const std::optional<at::Tensor>& grad_scores,
                                   const at::Tensor& weights, const at::Tensor& experts,
                                   const at::Tensor& scores, c10::string_view score,
                                   bool normalize, double scale, at::ScalarType logits_dtype) {
  std::vector<at::Tensor> inputs{grad_weights, weights, scores};
  if (grad_scores) inputs.push_back(*grad_scores);
  return NotTwiceDifferentiable::apply(
      "moe_routing::route_backward", at::TensorList(inputs), [&] {
        return variable_list{route_backward(grad_weights, grad_scores, weights, experts, scores,
                                            std::string(score), normalize, scale,
                                            logits_dtype)};
      })[0];
}

at::Tensor dispatch_backward_autograd(const at::Tensor& grad_out, const at::Tensor& slots) {
  return DispatchBackwardFunction::apply(grad_out, slots);
}

std::tuple<at::Tensor, at::Tensor> combine_backward_autograd(const at::Tensor& grad_y,
                                                             const at::Tensor& expert_out,
                                                             const at::Tensor& slots,
                                                             const at::Tensor& weights) {
  auto out = NotTwiceDifferentiable::apply(
      "moe_routing::combine_backward", at::TensorList{grad_y, expert_out, weights}, [&] {
        auto [grad_expert_out, grad_weights] = combine_backward(grad_y, expert_out, slots, weights);
        return variable_list{grad_expert_out, grad_weights};
      });
  return {out[0], out[1]};
}

at::Tensor load_balancing_loss_backward_autograd(const at::Tensor& grad, const at::Tensor& scores,
                                                 const at::Tensor& experts,
                                                 const std::optional<at::Tensor>& mask,
                                                 std::optional<c10::SymInt> seq_len) {
  static auto backward_op = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&,
                                          std::optional<c10::SymInt>)>(
      "moe_routing::load_balancing_loss_backward");
  return NotTwiceDifferentiable::apply("moe_routing::load_balancing_loss_backward",
                                       at::TensorList{grad, scores}, [&] {
                                         return variable_list{
                                             backward_op.call(grad, scores, experts, mask, seq_len)};
                                       })[0];
}

at::Tensor z_loss_backward_autograd(const at::Tensor& grad, const at::Tensor& logits,
                                    const std::optional<at::Tensor>& mask) {
  return NotTwiceDifferentiable::apply("moe_routing::z_loss_backward", at::TensorList{grad, logits}, [&] {
    return variable_list{z_loss_backward(grad, logits, mask)};
  })[0];
}

at::Tensor expert_choice_backward_autograd(const at::Tensor& grad_weights,
                                           const at::Tensor& tokens, c10::SymInt num_tokens) {
  static auto backward_op = op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>(
      "moe_routing::expert_choice_backward");
  return NotTwiceDifferentiable::apply("moe_routing::expert_choice_backward", at::TensorList{grad_weights}, [&] {
    return variable_list{backward_op.call(grad_weights, tokens, num_tokens)};
  })[0];
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_autograd(const at::Tensor& grad,
                                                                const at::Tensor& x,
                                                                const at::Tensor& weight,
                                                                const at::Tensor& counts) {
  auto out = NotTwiceDifferentiable::apply(
      "moe_routing::grouped_mm_backward", at::TensorList{grad, x, weight}, [&] {
        auto [grad_x, grad_weight] = grouped_mm_backward(grad, x, weight, counts);
        return variable_list{grad_x, grad_weight};
      });
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_autograd(
    const at::Tensor& logits, int64_t k, c10::string_view score, std::optional<bool> normalize,
    const std::optional<at::Tensor>& bias, int64_t num_groups, int64_t topk_groups,
    double scale, c10::string_view group_score) {
  auto out = RouteFunction::apply(logits, k, score, normalize, bias, num_groups, topk_groups,
                                  scale, group_score);
  return {out[0], out[1], out[2]};
}

at::Tensor dispatch_autograd(const at::Tensor& x, const at::Tensor& slots, c10::SymInt num_rows) {
  return DispatchFunction::apply(x, slots, std::move(num_rows));
}

at::Tensor combine_autograd(const at::Tensor& expert_out, const at::Tensor& slots,
                            const at::Tensor& weights) {
  return CombineFunction::apply(expert_out, slots, weights);
}

at::Tensor load_balancing_loss_autograd(const at::Tensor& scores, const at::Tensor& experts,
                                        const std::optional<at::Tensor>& mask,
                                        std::optional<c10::SymInt> seq_len) {
  return LoadBalancingLossFunction::apply(scores, experts, mask, std::move(seq_len));
}

std::tuple<at::Tensor, at::Tensor> expert_choice_autograd(const at::Tensor& scores,
                                                          c10::SymInt capacity,
                                                          const std::optional<at::Tensor>& mask) {
  auto out = ExpertChoiceFunction::apply(scores, std::move(capacity), mask);
  return {out[0], out[1]};
}

at::Tensor grouped_mm_autograd(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& counts) {
  return GroupedMmFunction::apply(x, weight, counts);
}

at::Tensor swiglu_backward_autograd(const at::Tensor& grad, const at::Tensor& h) {
  return NotTwiceDifferentiable::apply("moe_routing::swiglu_backward", at::TensorList{grad, h}, [&] {
    return variable_list{swiglu_backward(grad, h)};
  })[0];
}

at::Tensor swiglu_autograd(const at::Tensor& h) { return SwigluFunction::apply(h); }

at::Tensor z_loss_autograd(const at::Tensor& logits, const std::optional<at::Tensor>& mask) {
  return ZLossFunction::apply(logits, mask);
}

}  // namespace
}  // namespace moe_routing::autograd

TORCH_LIBRARY_IMPL(moe_routing, Autograd, m) {
  using namespace moe_routing::autograd;
  m.impl("route", &route_autograd);
  m.impl("dispatch", &dispatch_autograd);
  m.impl("combine", &combine_autograd);
  m.impl("load_balancing_loss", &load_balancing_loss_autograd);
  m.impl("z_loss", &z_loss_autograd);
  m.impl("expert_choice", &expert_choice_autograd);
  m.impl("grouped_mm", &grouped_mm_autograd);
  m.impl("swiglu", &swiglu_autograd);
  m.impl("route_backward", &route_backward_autograd);
  m.impl("dispatch_backward", &dispatch_backward_autograd);
  m.impl("combine_backward", &combine_backward_autograd);
  m.impl("load_balancing_loss_backward", &load_balancing_loss_backward_autograd);
  m.impl("z_loss_backward", &z_loss_backward_autograd);
  m.impl("expert_choice_backward", &expert_choice_backward_autograd);
  m.impl("grouped_mm_backward", &grouped_mm_backward_autograd);
  m.impl("swiglu_backward", &swiglu_backward_autograd);
}
