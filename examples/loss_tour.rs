//! A tour of the distillation losses on one device.
//!
//! ```text
//! cargo run --release --features flex --example loss_tour -- [--device ndarray|flex|wgpu|cuda]
//! ```
//!
//! It prints every divergence between a teacher and a student at several temperatures, then
//! distils the teacher into free student logits by gradient descent on the Hinton KD loss and
//! shows the student's distribution approach the teacher's.

use burn::tensor::{Device, Int, Tensor, TensorData, activation};
use burn_distill::loss::{
    Divergence, DivergenceLossConfig, HintonKdLossConfig, Reduction, available_devices, device_by_name,
};

/// A tour of the distillation losses.
#[derive(clap::Parser, Debug)]
#[command(name = "loss_tour")]
struct Args {
    /// ndarray, flex, wgpu or cuda (default: the first this build has).
    #[arg(long)]
    device: Option<String>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    let device_name = match args.device {
        Some(name) => name,
        None => available_devices()
            .first()
            .ok_or("no backend compiled in")?
            .name
            .to_string(),
    };
    let device = device_by_name(&device_name).ok_or_else(|| {
        let names: Vec<_> = available_devices().iter().map(|d| d.name).collect();
        format!("unknown device {device_name:?}; this build has {names:?}")
    })?;
    println!("device: {device_name}");

    // A teacher that is confident about class 2 and a student that leans towards class 0.
    let teacher = logits([[1.0, 2.0, 6.0, 0.5, -1.0], [0.0, 5.0, 1.0, 1.0, 0.0]], &device);
    let student = logits([[3.0, 1.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]], &device);
    let labels = Tensor::<1, Int>::from_ints([2, 1], &device);

    println!("\ndivergences (batch mean, per example), teacher p vs student q:");
    println!("{:<28}{:>10}{:>10}{:>10}", "divergence", "T = 1", "T = 4", "T = 20");
    for divergence in Divergence::ALL {
        let mut row = format!("{:<28}", format!("{divergence:?}"));
        for temperature in [1.0, 4.0, 20.0] {
            let value = DivergenceLossConfig::new(divergence)
                .with_temperature(temperature)
                .init()
                .forward(student.clone(), teacher.clone(), Reduction::BatchMean)?;
            row += &format!("{:>10.4}", value.into_scalar::<f32>());
        }
        println!("{row}");
    }

    println!("\ndistilling the teacher into free student logits (Hinton KD, T = 4, alpha = 0.1):");
    let loss = HintonKdLossConfig::new().with_temperature(4.0).with_alpha(0.1).init();
    let autodiff = device.clone().autodiff();
    let teacher_ad = teacher.clone().autodiff();
    let mut weights = student.clone().autodiff().detach();
    for step in 0..=200 {
        let current = weights.clone().require_grad();
        let value = loss.forward(
            current.clone(),
            teacher_ad.clone(),
            labels.clone(),
            Reduction::BatchMean,
        )?;
        if step % 50 == 0 {
            println!("  step {step:>3}: loss {:.5}", value.clone().into_scalar::<f32>());
        }
        let grad = current.grad(&value.backward()).ok_or("no gradient")?;
        weights = (current.detach() - grad.mul_scalar(0.5).to_device(&autodiff)).detach();
    }
    let show = |name: &str, t: Tensor<2>| {
        let p: Vec<f32> = activation::softmax(t.slice([0..1, 0..5]), 1)
            .into_data()
            .iter::<f32>()
            .collect();
        let p: Vec<String> = p.iter().map(|v| format!("{v:.3}")).collect();
        println!("  {name:<8} p(first example) = [{}]", p.join(", "));
    };
    show("teacher", teacher);
    show("student", weights.without_autodiff());
    Ok(())
}

fn logits(values: [[f32; 5]; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::from(values), device)
}
