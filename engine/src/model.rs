//! The DeepSeek decoder: embeddings, decoder layers (attention + dense MLP or MoE), final norm
//! and lm_head. Routed experts are not part of it: each MoE layer routes its tokens and hands
//! them to an [`Experts`] implementation, in-process or remote.
//!
//! One step runs a batch of sequences at once: the rows of all sequences are concatenated
//! (`[T, hidden]`), projections and experts run over all rows, attention runs per sequence over
//! its own cache. A sequence contributes one row when decoding and many when (chunk-)prefilling,
//! so mixed prefill/decode batches need nothing special.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::experts::{Experts, PendingExperts, RoutedOut};
use crate::kv_cache::SequenceCache;
use crate::layers::mla::{AttentionStep, DecodeBatch, SeqRows};
use crate::layers::{Attention, Linear, Mlp, RmsNorm, Rotary};
use crate::router::Router;
use crate::weights::Loader;

/// The shared-expert and router half of an MoE layer (routed experts live elsewhere).
#[derive(Debug, Clone)]
pub struct MoeBlock {
    pub router: Router,
    pub shared_experts: Option<Mlp>,
}

#[derive(Debug, Clone)]
pub enum FeedForward {
    Dense(Mlp),
    Moe(MoeBlock),
}

/// The residual stream between layers is f32 whatever the compute dtype: it accumulates the
/// output of every layer, and rounding it to bf16 at each addition is where a bf16 model drifts
/// most from its f32 reference. Norms read it in f32 and hand the compute dtype to the matmuls;
/// the router scores the f32 normed activations (a flipped expert choice is a large error).
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub index: usize,
    dtype: DType,
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pub mlp: FeedForward,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, loader: &Loader, index: usize) -> Result<Self> {
        let p = format!("model.layers.{index}");
        let h = cfg.hidden_size;
        let mlp = if cfg.is_moe_layer(index) {
            let shared_experts = if cfg.n_shared_experts > 0 {
                Some(Mlp::shared_experts(
                    loader,
                    &format!("{p}.mlp.shared_experts"),
                    h,
                    cfg.moe_intermediate_size * cfg.n_shared_experts,
                )?)
            } else {
                None
            };
            FeedForward::Moe(MoeBlock {
                router: Router::new(cfg, loader, &format!("{p}.mlp.gate"))?,
                shared_experts,
            })
        } else {
            FeedForward::Dense(Mlp::new(
                loader,
                &format!("{p}.mlp"),
                h,
                cfg.intermediate_size,
            )?)
        };
        Ok(DecoderLayer {
            index,
            dtype: loader.dtype(),
            input_layernorm: RmsNorm::new(
                loader,
                &format!("{p}.input_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            self_attn: Attention::new(cfg, loader, &format!("{p}.self_attn"))?,
            post_attention_layernorm: RmsNorm::new(
                loader,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            mlp,
        })
    }

    /// This layer's input norm (the previous layer fuses it into its last residual add).
    pub fn input_norm(&self) -> &RmsNorm {
        &self.input_layernorm
    }

    /// `x + attention(norm(x))`, with the feed-forward block's norm of it.
    pub fn attention_residual(
        &self,
        x: &Stream,
        step: &AttentionStep,
        rotary: &Rotary,
        caches: &mut [&mut SequenceCache],
    ) -> Result<Stream> {
        crate::cuda::trace_mark(x.h.device(), "attention");
        let xn = match &x.normed {
            Some((n, _)) => n.clone(),
            None => self.input_layernorm.forward_as(&x.h, self.dtype)?,
        };
        let a = self
            .self_attn
            .forward(&xn, self.index, step, rotary, caches)?;
        // The router scores the f32 norm of an MoE layer's input.
        let moe = matches!(self.mlp, FeedForward::Moe(_));
        residual(
            &x.h,
            Some(&a),
            None,
            Some((&self.post_attention_layernorm, moe)),
            self.dtype,
        )
    }

    /// `h + ffn(norm(h))`, calling `experts` for the routed part of an MoE layer; `next`: the
    /// next layer's input norm, applied to the result in the same pass on a GPU.
    pub fn ffn_residual(
        &self,
        h: &Stream,
        experts: &dyn Experts,
        next: Option<&RmsNorm>,
    ) -> Result<Stream> {
        let started = self.ffn_start(h, experts)?;
        self.ffn_finish(started, next)
    }

    /// First half of the feed-forward block: norms, routes, and sends routed experts off
    /// (a dense layer computes its MLP here).
    pub fn ffn_start(&self, h: &Stream, experts: &dyn Experts) -> Result<FfnInFlight> {
        crate::cuda::trace_mark(h.h.device(), "ffn");
        let (x, xf) = match &h.normed {
            Some((n, Some(nf))) => (n.clone(), nf.clone()),
            Some((n, None)) if matches!(self.mlp, FeedForward::Dense(_)) => (n.clone(), n.clone()),
            _ => self
                .post_attention_layernorm
                .forward_pair(&h.h, self.dtype)?,
        };
        let work = match &self.mlp {
            FeedForward::Dense(mlp) => Work::Done(mlp.forward(&x)?),
            FeedForward::Moe(moe) => {
                let handoff = match crate::cuda::gpu(xf.device()) {
                    Some(_) => experts.route_handoff(self.index, &x, moe.router.top_k())?,
                    None => None,
                };
                match moe.router.route_device(&xf, handoff.as_ref())? {
                    Some(routing) => match experts.dispatch_device(self.index, &x, &routing)? {
                        Some(pending) => Work::Routed(pending),
                        None => {
                            Work::Routed(experts.dispatch(self.index, &x, &routing.to_host()?)?)
                        }
                    },
                    None => {
                        let routing = moe.router.route(&xf)?;
                        Work::Routed(experts.dispatch(self.index, &x, &routing)?)
                    }
                }
            }
        };
        crate::cuda::trace_mark(h.h.device(), "dispatched");
        Ok(FfnInFlight {
            h: h.h.clone(),
            x,
            work,
        })
    }

    /// Second half: the shared experts (computed while the routed ones were away), then the
    /// routed output, then the residual (and `next`, the next layer's input norm, of it).
    pub fn ffn_finish(&self, f: FfnInFlight, next: Option<&RmsNorm>) -> Result<Stream> {
        // `part`: the dense MLP's or the shared experts' output (compute dtype); `routed`: the
        // routed experts' weighted sum. The shared experts run before waiting for the routed.
        let (part, routed) = match (f.work, &self.mlp) {
            (Work::Done(y), _) => (Some(y), None),
            (Work::Routed(pending), FeedForward::Moe(moe)) => {
                let shared = moe
                    .shared_experts
                    .as_ref()
                    .map(|s| s.forward(&f.x))
                    .transpose()?;
                crate::cuda::trace_mark(f.h.device(), "shared");
                let routed = match pending.wait_out()? {
                    RoutedOut::Sum(t) => t,
                    // The workers' parts: their wait and sum folded into the residual add and
                    // the next norm where that kernel takes them.
                    RoutedOut::Parts(parts) => {
                        if let Some(n) = next
                            && let Some(g) = crate::cuda::gpu(f.h.device())
                            && let Some(r) = g.wait_add_rms_norm(
                                &f.h,
                                shared.as_ref(),
                                &parts,
                                n.weight(),
                                n.eps(),
                                f.x.dtype(),
                                false,
                            )?
                        {
                            crate::cuda::trace_mark(f.h.device(), "routed");
                            return Ok(Stream {
                                h: r.h,
                                normed: Some((r.normed, r.normed_f32)),
                            });
                        }
                        parts.sum()?
                    }
                };
                crate::cuda::trace_mark(f.h.device(), "routed");
                (shared, Some(routed))
            }
            (Work::Routed(pending), FeedForward::Dense(_)) => (Some(pending.wait()?), None),
        };
        residual(
            &f.h,
            part.as_ref(),
            routed.as_ref(),
            next.map(|n| (n, false)),
            f.x.dtype(),
        )
    }
}

/// The residual stream (f32) after a block, and the next block's norm of it where the GPU
/// computed that in the same pass as the residual add ([`crate::cuda::Gpu::add_rms_norm`]): the
/// norm in the compute dtype, and in f32 when the next block routes (the router's input).
#[derive(Debug, Clone)]
pub struct Stream {
    h: Tensor,
    normed: Option<(Tensor, Option<Tensor>)>,
}

impl Stream {
    /// The stream entering the first layer (nothing normed yet).
    pub fn new(h: Tensor) -> Self {
        Stream { h, normed: None }
    }

    /// The residual stream, `[T, hidden]` f32.
    pub fn hidden(&self) -> &Tensor {
        &self.h
    }

    pub fn into_hidden(self) -> Tensor {
        self.h
    }

    /// Rows `rows` (`[n]` u32) of the stream and of its norm, in that order.
    fn select_rows(self, rows: &Tensor) -> Result<Self> {
        let pick = |t: Tensor| t.index_select(rows, 0);
        Ok(Stream {
            h: pick(self.h)?,
            normed: match self.normed {
                Some((n, nf)) => Some((pick(n)?, nf.map(pick).transpose()?)),
                None => None,
            },
        })
    }
}

/// `h + (a + b)` (`a` the compute dtype's delta, `b` an f32 one, either absent), and, with
/// `norm = Some((n, want_f32))`, `n` of the result for the next block: one kernel on a GPU.
fn residual(
    h: &Tensor,
    a: Option<&Tensor>,
    b: Option<&Tensor>,
    norm: Option<(&RmsNorm, bool)>,
    dtype: DType,
) -> Result<Stream> {
    if let Some(g) = crate::cuda::gpu(h.device()) {
        // The routed sum kept in f32 up to the residual.
        let b = b.map(|b| b.to_dtype(DType::F32)).transpose()?;
        if let Some((n, want_f32)) = norm
            && let Some(r) =
                g.add_rms_norm(h, a, b.as_ref(), n.weight(), n.eps(), dtype, want_f32)?
        {
            return Ok(Stream {
                h: r.h,
                normed: Some((r.normed, r.normed_f32)),
            });
        }
        if let Some(out) = g.residual_add(h, a, b.as_ref())? {
            return Ok(Stream::new(out));
        }
        return Ok(Stream::new(add_deltas(h.clone(), b, a.cloned(), dtype)?));
    }
    Ok(Stream::new(add_deltas(
        h.clone(),
        b.cloned(),
        a.cloned(),
        dtype,
    )?))
}

/// `h + (routed + part)`, the deltas added in the compute dtype and the result in f32.
fn add_deltas(
    h: Tensor,
    routed: Option<Tensor>,
    part: Option<Tensor>,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let y = match (routed, part) {
        (Some(r), Some(p)) => (r.to_dtype(dtype)? + p)?,
        (Some(r), None) => r.to_dtype(dtype)?,
        (None, Some(p)) => p,
        (None, None) => return Ok(h),
    };
    h + y.to_dtype(DType::F32)?
}

enum Work {
    Done(Tensor),
    Routed(PendingExperts),
}

/// A feed-forward block between [`DecoderLayer::ffn_start`] and [`DecoderLayer::ffn_finish`].
pub struct FfnInFlight {
    h: Tensor,
    x: Tensor,
    work: Work,
}

/// What of the dense model to load: the frontend needs only embeddings (for a gate that takes
/// activations), the gate and the in-process engine all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    pub embeddings: bool,
    pub decoder: bool,
}

impl Parts {
    pub const ALL: Parts = Parts {
        embeddings: true,
        decoder: true,
    };
}

/// One sequence's share of a step: its cache and how many new rows it contributes.
pub struct StepSeq<'a> {
    pub cache: &'a mut SequenceCache,
    pub new_tokens: usize,
}

#[derive(Debug, Clone)]
pub struct DeepSeekModel {
    cfg: ModelConfig,
    /// `[vocab, hidden]`, when loaded.
    embed_tokens: Option<Tensor>,
    layers: Vec<DecoderLayer>,
    norm: Option<RmsNorm>,
    lm_head: Option<Linear>,
    rotary: Rotary,
    device: Device,
    dtype: DType,
}

impl DeepSeekModel {
    pub fn load(cfg: &ModelConfig, loader: &Loader, parts: Parts) -> Result<Self> {
        if let Some(g) = crate::cuda::gpu(loader.device()) {
            g.preload()?;
        }
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = if parts.embeddings || (parts.decoder && cfg.tie_word_embeddings) {
            Some(loader.get("model.embed_tokens.weight", &[v, h])?)
        } else {
            None
        };
        let (layers, norm, lm_head) = if parts.decoder {
            let layers = (0..cfg.num_hidden_layers)
                .map(|i| DecoderLayer::new(cfg, loader, i))
                .collect::<Result<Vec<_>>>()?;
            let norm = RmsNorm::new(loader, "model.norm.weight", h, cfg.rms_norm_eps)?;
            let lm_head = match (&embed_tokens, cfg.tie_word_embeddings) {
                (Some(e), true) => Linear::from_weight(e.clone()),
                _ => Linear::new_dense(loader, "lm_head", h, v, false)?,
            };
            (layers, Some(norm), Some(lm_head))
        } else {
            (Vec::new(), None, None)
        };
        Ok(DeepSeekModel {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: Rotary::new(cfg),
            device: loader.device().clone(),
            dtype: loader.dtype(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Skews every MoE layer's router by Zipf exponent `s` (`--router-skew`, see
    /// [`crate::router::zipf_skew`]); 0 turns it off. A load-testing knob: outputs change.
    pub fn set_router_skew(&mut self, s: f32) -> Result<()> {
        for layer in &mut self.layers {
            if let FeedForward::Moe(moe) = &mut layer.mlp {
                moe.router.set_skew(layer.index, s)?;
            }
        }
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    pub fn rotary(&self) -> &Rotary {
        &self.rotary
    }

    /// An empty KV cache for one sequence of this model.
    pub fn new_cache(&self) -> SequenceCache {
        SequenceCache::new(&self.cfg, self.dtype, &self.device)
    }

    /// Whether this process loaded the embedding table ([`embed`](Self::embed) works).
    pub fn has_embeddings(&self) -> bool {
        self.embed_tokens.is_some()
    }

    /// Embedding rows for token ids, `[T, hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let table = self.embed_tokens.as_ref().ok_or_else(|| {
            EngineError::NotLoaded("this process did not load the embedding table".into())
        })?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (vocab_size {})",
                self.cfg.vocab_size
            )));
        }
        let idx = Tensor::from_slice(ids, ids.len(), &self.device)?;
        Ok(table.index_select(&idx, 0)?)
    }

    /// Runs every decoder layer over a step's rows (`hidden: [T, hidden]`, sequences in order)
    /// and commits the new tokens to each cache. Returns the last layer's output, f32 (before the
    /// final norm). `observe(i, h)` sees the output of layer `i`.
    pub fn forward_hidden(
        &self,
        hidden: &Tensor,
        seqs: &mut [StepSeq],
        experts: &dyn Experts,
        observe: impl FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        self.forward_hidden_rows(hidden, seqs, experts, None, observe)
    }

    /// [`forward_hidden`](Self::forward_hidden) that returns only rows `out_rows` (`[n]` u32,
    /// row indices of the step) of the last layer's output, in that order: the last layer's
    /// attention runs over every row (their KV is needed later), its feed-forward block only over
    /// those rows, since nothing reads the others (a prefill's rows but its last).
    pub fn forward_hidden_rows(
        &self,
        hidden: &Tensor,
        seqs: &mut [StepSeq],
        experts: &dyn Experts,
        out_rows: Option<&Tensor>,
        mut observe: impl FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        let (rows, positions) = self.plan(hidden, seqs)?;
        let (cos, sin) = self.rotary.cos_sin(&positions, self.dtype, &self.device)?;
        let mut caches: Vec<&mut SequenceCache> = seqs.iter_mut().map(|s| &mut *s.cache).collect();
        let step = AttentionStep {
            rows: &rows,
            cos: &cos,
            sin: &sin,
            decode: self.decode_batch(&rows, &caches)?,
        };
        let layers = self.run_layers(
            hidden.to_dtype(DType::F32)?,
            &step,
            &mut caches,
            experts,
            out_rows,
            &mut observe,
        );
        // Settled on failure too (the experts' device work of the step is then waited for).
        let settled = experts.settle();
        let x = layers?;
        settled?;
        for s in seqs.iter_mut() {
            s.cache.commit(s.new_tokens);
        }
        Ok(x)
    }

    /// Every decoder layer over `x [T, hidden]` (f32) for one step: the one layer loop of
    /// [`forward_hidden`](Self::forward_hidden) and of a decode step's CUDA graph
    /// ([`crate::graphs`], whose batch the fused kernels attend without `caches`). Neither
    /// settles the experts nor commits. `out_rows`: see
    /// [`forward_hidden_rows`](Self::forward_hidden_rows).
    pub(crate) fn run_layers(
        &self,
        x: Tensor,
        step: &AttentionStep,
        caches: &mut [&mut SequenceCache],
        experts: &dyn Experts,
        out_rows: Option<&Tensor>,
        observe: &mut dyn FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        let last = self.layers.len().saturating_sub(1);
        let mut x = Stream::new(x);
        for (i, layer) in self.layers.iter().enumerate() {
            let mut h = layer.attention_residual(&x, step, &self.rotary, caches)?;
            if i == last
                && let Some(rows) = out_rows
            {
                h = h.select_rows(rows)?;
            }
            let next = self.layers.get(i + 1).map(DecoderLayer::input_norm);
            x = layer.ffn_residual(&h, experts, next)?;
            observe(layer.index, x.hidden());
        }
        Ok(x.into_hidden())
    }

    /// The whole of `ids` as one new sequence, in one step (a fresh cache, dropped afterwards):
    /// the last layer's output for every position, as [`forward_hidden`](Self::forward_hidden)
    /// returns it. For reference comparisons that need every position, not for serving.
    pub fn forward_sequence(
        &self,
        ids: &[u32],
        experts: &dyn Experts,
        observe: impl FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        let mut cache = self.new_cache();
        let emb = self.embed(ids)?;
        let mut seqs = [StepSeq {
            cache: &mut cache,
            new_tokens: ids.len(),
        }];
        self.forward_hidden(&emb, &mut seqs, experts, observe)
    }

    /// Like [`forward_hidden`](Self::forward_hidden), but splits the step's sequences into two
    /// micro-batches of about equal tokens and interleaves them per layer: while one half's
    /// routed experts are away (in expert workers), the other half runs its attention, and the
    /// first half's shared experts run while the second half's experts are away. The result is
    /// the same as the one-batch forward (each sequence's attention is its own; experts act
    /// per token).
    pub fn forward_hidden_overlapped(
        &self,
        hidden: &Tensor,
        seqs: &mut [StepSeq],
        experts: &dyn Experts,
    ) -> Result<Tensor> {
        if seqs.len() < 2 {
            return self.forward_hidden(hidden, seqs, experts, |_, _| {});
        }
        let (rows, positions) = self.plan(hidden, seqs)?;
        let total = hidden.dim(0)?;
        // Split by sequences at the point closest to half the tokens (at least one each side).
        let split = (1..seqs.len())
            .min_by_key(|&i| (2 * rows[i].start).abs_diff(total))
            .unwrap_or(1);
        let cut = rows[split].start;
        let (cos, sin) = self.rotary.cos_sin(&positions, self.dtype, &self.device)?;
        let rows_a: Vec<SeqRows> = rows[..split].to_vec();
        let rows_b: Vec<SeqRows> = rows[split..]
            .iter()
            .map(|r| SeqRows {
                start: r.start - cut,
                len: r.len,
            })
            .collect();
        let (cos_a, sin_a) = (cos.narrow(0, 0, cut)?, sin.narrow(0, 0, cut)?);
        let (cos_b, sin_b) = (
            cos.narrow(0, cut, total - cut)?,
            sin.narrow(0, cut, total - cut)?,
        );
        let x = hidden.to_dtype(DType::F32)?;
        let (mut xa, mut xb) = (
            Stream::new(x.narrow(0, 0, cut)?),
            Stream::new(x.narrow(0, cut, total - cut)?),
        );
        {
            let (sa, sb) = seqs.split_at_mut(split);
            let mut ca: Vec<&mut SequenceCache> = sa.iter_mut().map(|s| &mut *s.cache).collect();
            let mut cb: Vec<&mut SequenceCache> = sb.iter_mut().map(|s| &mut *s.cache).collect();
            let step_a = AttentionStep {
                rows: &rows_a,
                cos: &cos_a,
                sin: &sin_a,
                decode: self.decode_batch(&rows_a, &ca)?,
            };
            let step_b = AttentionStep {
                rows: &rows_b,
                cos: &cos_b,
                sin: &sin_b,
                decode: self.decode_batch(&rows_b, &cb)?,
            };
            let layers = (|| {
                for (i, layer) in self.layers.iter().enumerate() {
                    let next = self.layers.get(i + 1).map(DecoderLayer::input_norm);
                    let ha = layer.attention_residual(&xa, &step_a, &self.rotary, &mut ca)?;
                    let fa = layer.ffn_start(&ha, experts)?;
                    let hb = layer.attention_residual(&xb, &step_b, &self.rotary, &mut cb)?;
                    let fb = layer.ffn_start(&hb, experts)?;
                    xa = layer.ffn_finish(fa, next)?;
                    xb = layer.ffn_finish(fb, next)?;
                }
                Ok::<_, crate::error::EngineError>(())
            })();
            let settled = experts.settle();
            layers?;
            settled?;
        }
        for s in seqs.iter_mut() {
            s.cache.commit(s.new_tokens);
        }
        Ok(Tensor::cat(&[xa.into_hidden(), xb.into_hidden()], 0)?)
    }

    fn decode_batch(
        &self,
        rows: &[SeqRows],
        caches: &[&mut SequenceCache],
    ) -> Result<Option<DecodeBatch>> {
        DecodeBatch::plan(
            rows,
            caches,
            self.cfg.kv_lora_rank,
            self.cfg.qk_rope_head_dim,
            &self.device,
        )
    }

    /// Checks the step's shape against the caches, reserves KV room, and lays out each
    /// sequence's rows and positions.
    pub fn plan(
        &self,
        hidden: &Tensor,
        seqs: &mut [StepSeq],
    ) -> Result<(Vec<SeqRows>, Vec<usize>)> {
        let t = hidden.dim(0)?;
        let total: usize = seqs.iter().map(|s| s.new_tokens).sum();
        if total != t {
            return Err(EngineError::InvalidInput(format!(
                "step has {t} activation rows but its sequences add up to {total} tokens"
            )));
        }
        let mut rows = Vec::with_capacity(seqs.len());
        let mut positions = Vec::with_capacity(t);
        let mut start = 0;
        for s in seqs.iter_mut() {
            if s.new_tokens == 0 {
                return Err(EngineError::InvalidInput(
                    "a sequence in the step has no new tokens".into(),
                ));
            }
            s.cache.reserve(self.cfg.num_hidden_layers, s.new_tokens)?;
            let past = s.cache.len();
            positions.extend(past..past + s.new_tokens);
            rows.push(SeqRows {
                start,
                len: s.new_tokens,
            });
            start += s.new_tokens;
        }
        Ok((rows, positions))
    }

    /// The final RMSNorm applied to last-layer hidden rows.
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        let norm = self.norm.as_ref().ok_or_else(|| {
            EngineError::NotLoaded("this process did not load the decoder (final norm)".into())
        })?;
        norm.forward_as(hidden, self.dtype)
    }

    /// Logits `[rows, vocab]` in f32 from last-layer hidden rows: `lm_head(norm(h))`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (norm, lm_head) = match (&self.norm, &self.lm_head) {
            (Some(n), Some(l)) => (n, l),
            _ => {
                return Err(EngineError::NotLoaded(
                    "this process did not load the decoder (final norm and lm_head)".into(),
                ));
            }
        };
        Ok(lm_head
            .forward(&norm.forward_as(hidden, self.dtype)?)?
            .to_dtype(DType::F32)?)
    }

    /// Convenience for a step that wants each sequence's last-row logits (`[seqs, vocab]`).
    pub fn step_last_logits(
        &self,
        hidden: &Tensor,
        seqs: &mut [StepSeq],
        experts: &dyn Experts,
    ) -> Result<Tensor> {
        let lens: Vec<usize> = seqs.iter().map(|s| s.new_tokens).collect();
        let out = self.forward_hidden(hidden, seqs, experts, |_, _| {})?;
        let mut last = Vec::with_capacity(lens.len());
        let mut end = 0;
        for n in lens {
            end += n;
            last.push(end as u32 - 1);
        }
        let n = last.len();
        let idx = Tensor::from_vec(last, n, &self.device)?;
        self.logits(&out.index_select(&idx, 0)?)
    }
}
