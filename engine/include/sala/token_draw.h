// One token's draw: plain data, shared by the CPU sampler and the GPU kernel (built as C++17).
#pragma once

namespace sala {

// Everything one token's draw needs, so that it can be made where the logits are (host or GPU).
// The token for logits l is:
//   - temperature 0: the largest logit's id (the lowest id among equals);
//   - otherwise, with weights w_i = exp((l_i - max l) / temperature), among the candidates
//       * the logits >= the top_k-th largest (every logit when top_k is 0 or >= the vocabulary;
//         logits equal to the cut stay in, as in Hugging Face's top-k warper),
//       * of those, the logits >= the largest value v whose candidates at or above v hold at
//         least top_p of the candidates' weight,
//     the first id, in id order, at which the running weight exceeds u times the total weight.
// Walking in id order rather than by logit gives the same distribution and needs no sort.
struct TokenDraw {
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  double u = 0.0;  // uniform in [0, 1)
};

}  // namespace sala
