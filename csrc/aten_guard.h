// The dispatch state of an op kernel that is written with ATen ops (latent_pool_aten.cpp, infonce_gemm.cpp).
#pragma once
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace nvembed {

// Held for the whole kernel:
//  * below autograd: the ops' backward ops have no derivative, and under create_graph=True torch's fallback for them
//    calls the kernel with autograd still on, so the ATen ops inside saw tensors that require grad (out= variants
//    raised "functions with out=... arguments don't support automatic differentiation"; the others built a graph
//    nobody uses);
//  * outside autocast: the ATen ops run in the dtypes the kernel chooses; an enclosing autocast region must not
//    recast them.
struct AtenKernelGuard {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

}  // namespace nvembed
