//! Forward + backward of the feature and relational losses at realistic shapes, on every device
//! this build has: attention transfer on `[128, 256, 8, 8]` maps, RKD / PKT / SP / CKA / CRD on
//! 512-wide embeddings of a batch of 128, DIST on `[128, 1000]` logits, hidden-state MSE and
//! cosine on `[8, 256, 576]` (SmolLM2's width). `scripts/compare_relations.py` times PyTorch
//! eager on the same shapes.
//!
//! Bench ids are `relation/<device>/<loss>`, e.g.
//! `cargo bench --features flex --bench bench_main -- relation/flex/`.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use burn_distill::loss::{
    AttentionTransferLossConfig, CkaLossConfig, CrdLossConfig, DistLossConfig, HiddenDistance, HiddenStateLossConfig,
    PktLossConfig, Reduction, RkdLossConfig, SpLossConfig, runnable_devices,
};
use criterion::{Criterion, criterion_group};

/// Deterministic values in [-1, 1) made on the host, identical on every device.
fn values<const D: usize>(shape: [usize; D], seed: u32, device: &Device) -> Tensor<D> {
    let count: usize = shape.iter().product();
    let data: Vec<f32> = (0..count)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (x >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// One element of `grad` read back: waits for the device (the GPU ones queue their work) without
/// timing a copy of the whole gradient, which PyTorch's side (`s.grad`) does not make either.
fn settle<const D: usize>(grad: Tensor<D>) -> TensorData {
    grad.slice(std::array::from_fn::<_, D, _>(|_| 0..1)).into_data()
}

/// Times `loss(student, teacher)` forward and backward, up to a gradient ready to read.
fn time<const D: usize>(
    c: &mut Criterion,
    id: String,
    student: Tensor<D>,
    teacher: Tensor<D>,
    loss: impl Fn(Tensor<D>, Tensor<D>) -> Tensor<1>,
) {
    c.bench_function(&id, |bencher| {
        bencher.iter(|| {
            let student = student.clone().require_grad();
            let grads = loss(student.clone(), teacher.clone()).backward();
            settle(student.grad(&grads).expect("gradient"))
        })
    });
}

fn bench_relations(c: &mut Criterion) {
    for named in runnable_devices() {
        let device = named.device.clone().autodiff();
        let id = |loss: &str| format!("relation/{}/{loss}", named.name);
        let embeddings = || (values([128, 512], 1, &device), values([128, 512], 2, &device));

        let at = AttentionTransferLossConfig::new().with_check_inputs(false).init();
        time(
            c,
            id("at_128x256x8x8"),
            values([128, 256, 8, 8], 1, &device),
            values([128, 256, 8, 8], 2, &device),
            |s, t| at.forward(s, t, Reduction::BatchMean).unwrap(),
        );
        let (s, t) = embeddings();
        let rkd = RkdLossConfig::new().with_check_inputs(false).init();
        time(c, id("rkd_128x512"), s.clone(), t.clone(), |s, t| {
            rkd.forward(s, t).unwrap()
        });
        let pkt = PktLossConfig::new().with_check_inputs(false).init();
        time(c, id("pkt_128x512"), s.clone(), t.clone(), |s, t| {
            pkt.forward(s, t).unwrap()
        });
        let sp = SpLossConfig::new().with_check_inputs(false).init();
        time(c, id("sp_128x512"), s.clone(), t.clone(), |s, t| {
            sp.forward(s, t).unwrap()
        });
        let cka = CkaLossConfig::new().with_check_inputs(false).init();
        time(c, id("cka_128x512"), s.clone(), t.clone(), |s, t| {
            cka.forward(s, t).unwrap()
        });
        let dist = DistLossConfig::new().with_check_inputs(false).init();
        time(
            c,
            id("dist_128x1000"),
            values([128, 1000], 1, &device).mul_scalar(4.0),
            values([128, 1000], 2, &device).mul_scalar(4.0),
            |s, t| dist.forward(s, t).unwrap(),
        );
        for (name, distance) in [
            ("hidden_mse", HiddenDistance::Mse),
            ("hidden_cosine", HiddenDistance::Cosine),
        ] {
            let loss = HiddenStateLossConfig::new()
                .with_distance(distance)
                .with_check_inputs(false)
                .init();
            let mask: Tensor<2, Bool> = values([8, 256], 3, &device).greater_elem(-0.8);
            time(
                c,
                id(&format!("{name}_8x256x576")),
                values([8, 256, 576], 1, &device),
                values([8, 256, 576], 2, &device),
                |s, t| loss.forward_masked(s, t, mask.clone(), Reduction::BatchMean).unwrap(),
            );
        }
        // CRD: embeddings to 128, 4096 negatives from banks of 50 000 examples (CIFAR-100's
        // training set), the bank update included.
        let crd = CrdLossConfig::new(512, 512, 50_000)
            .with_check_inputs(false)
            .init(&device);
        let indices: Vec<i64> = (0..128).map(|i| i * 37).collect();
        let negatives = crd.sample_negatives(&indices, 1, &device);
        let indices: Tensor<1, Int> = Tensor::from_data(TensorData::new(indices, [128]), &device);
        c.bench_function(&id("crd_128x512_k4096"), |bencher| {
            bencher.iter(|| {
                let student = s.clone().require_grad();
                let output = crd
                    .forward(student.clone(), t.clone(), indices.clone(), negatives.clone())
                    .unwrap();
                let grads = output.loss.backward();
                let updated = crd.clone().update(output.update);
                (
                    settle(student.grad(&grads).expect("gradient")),
                    updated.banks().0.slice([0..1, 0..1]).into_data(),
                )
            })
        });
    }
}

criterion_group!(benches, bench_relations);
