//! The `Teacher` and `Student` traits and the adapters that turn burn modules into them.

use burn::module::Module;
use burn::tensor::kind::Autodiff;
use burn::tensor::{Device, FloatDType, Tensor};

use crate::error::{ModelError, Result};
use crate::fingerprint::Fingerprint;
use crate::output::{Features, StudentHidden, StudentOutput, TeacherOutput, select_taps};

/// Something that gives teacher outputs for a batch: a live model, an ensemble, a cache of
/// pre-computed outputs. Nothing here assumes a module.
///
/// `D` is the rank of the logits: 2 for `[batch, classes]`, 3 for `[batch, seq, vocab]`.
/// Outputs are [`TeacherOutput`]s, which carry no autodiff, so no gradient can reach a teacher.
pub trait Teacher<I, const D: usize> {
    /// The teacher's logits for `input`, with the features named in `taps`.
    ///
    /// # Errors
    /// [`ModelError::UnknownTap`](crate::ModelError::UnknownTap) for a tap the teacher lacks.
    fn teach(&self, input: I, taps: &[&str]) -> Result<TeacherOutput<D>>;

    /// The teacher's outputs for `input`, whose examples are `indices` of the dataset the
    /// batch was drawn from. A live teacher ignores the indices (the default calls
    /// [`Teacher::teach`]); a cache of outputs serves exactly those examples. Training loops
    /// call this one.
    ///
    /// # Errors
    /// As [`Teacher::teach`]; a cache also refuses indices outside its dataset.
    fn teach_examples(&self, input: I, indices: &[usize], taps: &[&str]) -> Result<TeacherOutput<D>> {
        let _ = indices;
        self.teach(input, taps)
    }

    /// The number of classes (vocabulary size) of the logits.
    fn num_classes(&self) -> usize;

    /// Whether this teacher answers by dataset index only (a cache of outputs): it can then serve
    /// only the dataset it was built for, and must not be asked about other examples (an
    /// evaluation set, say) whose indices would name other examples of that dataset.
    fn needs_indices(&self) -> bool {
        false
    }

    /// A fingerprint of what determines this teacher's outputs (its weights), when it has one.
    /// Caches of teacher outputs record it and refuse to serve another teacher.
    fn fingerprint(&self) -> Option<Fingerprint> {
        None
    }
}

/// A model being trained: its outputs keep their autodiff graph.
pub trait Student<I, const D: usize> {
    /// The student's logits for `input`, with the features named in `taps`.
    ///
    /// # Errors
    /// [`ModelError::UnknownTap`](crate::ModelError::UnknownTap) for a tap the student lacks.
    fn learn(&self, input: I, taps: &[&str]) -> Result<StudentOutput<D>>;

    /// The student's last hidden states and head weight instead of its logits, for students
    /// whose logits are one linear layer (language models): a loss can then run through the
    /// chunked `LinearHeadKd` and the `[positions, vocab]` logits never exist whole. `None`
    /// (the default): the student only gives logits.
    ///
    /// # Errors
    /// As [`Student::learn`].
    fn learn_hidden(&self, input: I, taps: &[&str]) -> Option<Result<StudentHidden<D>>> {
        let _ = (input, taps);
        None
    }
}

/// A burn module whose forward pass also reports named intermediate features.
///
/// Implementing it is all a model needs to become a [`Student`] (blanket implementation) and,
/// wrapped in [`FrozenTeacher`], a [`Teacher`]:
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::tensor::{Device, FloatDType, Tensor};
/// use burn_distill_model::{Features, FrozenTeacher, Student, TappedForward, Teacher};
///
/// #[derive(Module, Debug)]
/// struct MyNet {
///     layer: Linear,
/// }
///
/// impl TappedForward<Tensor<2>, 2> for MyNet {
///     fn forward_tapped(&self, input: Tensor<2>) -> (Tensor<2>, Features) {
///         (self.layer.forward(input), Features::new())
///     }
///     fn num_classes(&self) -> usize {
///         self.layer.weight.val().dims()[1]
///     }
/// }
///
/// # let device = burn_distill_loss::available_devices().remove(0).device;
/// let net = MyNet { layer: LinearConfig::new(4, 3).init(&device) };
/// let teacher = FrozenTeacher::new(&net);
/// let input = Tensor::<2>::ones([2, 4], &device);
/// let soft = teacher.teach(input.clone(), &[]).unwrap();
/// assert_eq!(soft.logits().dims(), [2, 3]);
///
/// let student_out = net.learn(input, &[]).unwrap();
/// assert_eq!(student_out.logits.dims(), [2, 3]);
/// ```
pub trait TappedForward<I, const D: usize>: Module {
    /// Logits and every feature the model can tap.
    fn forward_tapped(&self, input: I) -> (Tensor<D>, Features);

    /// The number of classes of the logits.
    fn num_classes(&self) -> usize;

    /// The last hidden states `[.., width]`, the head weight `[classes, width]` whose product
    /// are the logits, and every feature; `None` (the default) where the logits are not one
    /// bias-free linear layer. See [`Student::learn_hidden`].
    fn forward_hidden_tapped(&self, input: I) -> Option<(Tensor<D>, Tensor<2>, Features)> {
        let _ = input;
        None
    }
}

impl<M, I, const D: usize> Student<I, D> for M
where
    M: TappedForward<I, D>,
{
    fn learn(&self, input: I, taps: &[&str]) -> Result<StudentOutput<D>> {
        let (logits, features) = self.forward_tapped(input);
        Ok(StudentOutput {
            logits,
            features: select_taps(features, taps)?,
        })
    }

    fn learn_hidden(&self, input: I, taps: &[&str]) -> Option<Result<StudentHidden<D>>> {
        let (hidden, head, features) = self.forward_hidden_tapped(input)?;
        Some(select_taps(features, taps).map(|features| StudentHidden { hidden, head, features }))
    }
}

/// Inputs a teacher can take off the autodiff device before its forward pass, so that not a
/// single teacher operation is recorded in a graph.
pub trait TeacherInput {
    /// The same input without autodiff.
    fn without_autodiff(self) -> Self;

    /// The same input on `device` (a [`TeacherOn`] moves its inputs to the teacher's device).
    fn to_device(self, device: &Device) -> Self;

    /// The device the input lives on.
    fn device(&self) -> Device;

    /// The same input with its float tensors in `dtype` (integer and boolean tensors, token ids
    /// and masks, unchanged): what a model whose weights are in `dtype` takes, for a
    /// mixed-precision forward pass.
    fn with_float_dtype(self, dtype: FloatDType) -> Self;
}

impl<const D: usize, K: Autodiff + 'static> TeacherInput for Tensor<D, K> {
    fn with_float_dtype(self, dtype: FloatDType) -> Self {
        // Only a float tensor is cast; the kind is generic here, so it is recognised by type.
        let mut slot = Some(self);
        if let Some(float) = (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<Tensor<D>>>()
            && let Some(tensor) = float.take()
        {
            *float = Some(if tensor.dtype() == dtype.into() {
                tensor
            } else {
                tensor.cast(dtype)
            });
        }
        slot.expect("the slot is refilled")
    }

    fn without_autodiff(self) -> Self {
        Tensor::without_autodiff(self)
    }

    fn to_device(self, device: &Device) -> Self {
        Tensor::to_device(self, device)
    }

    fn device(&self) -> Device {
        Tensor::device(self)
    }
}

impl<A: TeacherInput, B: TeacherInput> TeacherInput for (A, B) {
    fn without_autodiff(self) -> Self {
        (self.0.without_autodiff(), self.1.without_autodiff())
    }

    fn to_device(self, device: &Device) -> Self {
        (self.0.to_device(device), self.1.to_device(device))
    }

    fn device(&self) -> Device {
        self.0.device()
    }

    fn with_float_dtype(self, dtype: FloatDType) -> Self {
        (self.0.with_float_dtype(dtype), self.1.with_float_dtype(dtype))
    }
}

/// A teacher that lives on a device of its own: another GPU, or a device hosted by a
/// burn-remote server in another process or on another machine
/// (`Device::remote_options(&RemoteHost::websocket("ws://gpu:3000")).init()`).
///
/// Each call moves the input (without autodiff) to the teacher's device and the outputs back
/// to the input's device, so the student and its loss stay where they are. A failure on the
/// teacher's device (a remote server that went away, a lost GPU) is returned as
/// [`ModelError::TeacherDevice`], naming the device, instead of unwinding through the training
/// loop: the loop stops with that error and its last checkpoint, from which the run resumes.
///
/// ```no_run
/// # use burn::tensor::Device;
/// # use burn_distill_model::{FrozenTeacher, Mlp, MlpConfig, TeacherOn};
/// let teacher_device = Device::flex(); // or a remote device
/// let teacher = MlpConfig::new(784, vec![1200, 1200], 10).init(&teacher_device);
/// let teacher = TeacherOn::new(FrozenTeacher::new(&teacher), teacher_device);
/// ```
#[derive(Debug, Clone)]
pub struct TeacherOn<T> {
    teacher: T,
    device: Device,
}

impl<T> TeacherOn<T> {
    /// `teacher`, whose weights live on `device`.
    pub fn new(teacher: T, device: Device) -> Self {
        Self { teacher, device }
    }

    /// The teacher's device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The wrapped teacher.
    pub fn inner(&self) -> &T {
        &self.teacher
    }

    fn run<I: TeacherInput, const D: usize>(
        &self,
        input: I,
        teach: impl FnOnce(I) -> Result<TeacherOutput<D>>,
    ) -> Result<TeacherOutput<D>> {
        let home = input.device();
        let device = self.device.clone();
        // A remote device whose server is gone panics inside burn; the panic stops at this
        // boundary and becomes an error that names the device.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let output = teach(input.without_autodiff().to_device(&device))?;
            let output = output.to_device(&home);
            // Reading the logits here surfaces a failed transfer now, inside this boundary,
            // rather than at the loss's first read.
            home.sync().map_err(|err| ModelError::TeacherDevice {
                device: format!("{device:?}"),
                message: err.to_string(),
            })?;
            Ok(output)
        }));
        outcome.unwrap_or_else(|payload| {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the teacher's device failed".to_string());
            Err(ModelError::TeacherDevice {
                device: format!("{:?}", self.device),
                message,
            })
        })
    }
}

impl<T, I, const D: usize> Teacher<I, D> for TeacherOn<T>
where
    T: Teacher<I, D>,
    I: TeacherInput,
{
    fn teach(&self, input: I, taps: &[&str]) -> Result<TeacherOutput<D>> {
        self.run(input, |input| self.teacher.teach(input, taps))
    }

    fn teach_examples(&self, input: I, indices: &[usize], taps: &[&str]) -> Result<TeacherOutput<D>> {
        self.run(input, |input| self.teacher.teach_examples(input, indices, taps))
    }

    fn num_classes(&self) -> usize {
        self.teacher.num_classes()
    }

    fn needs_indices(&self) -> bool {
        self.teacher.needs_indices()
    }

    fn fingerprint(&self) -> Option<Fingerprint> {
        self.teacher.fingerprint()
    }
}

/// `module` with every float parameter cast to `dtype`, parameter ids kept. On an autodiff
/// device the cast parameters are casts of the originals inside the graph: a forward and
/// backward pass through the result runs in `dtype` and the gradients reach the original
/// (f32) parameters, which is how mixed-precision training uses it.
pub fn cast_params<M: Module>(module: M, dtype: FloatDType) -> M {
    struct Cast(FloatDType);
    impl burn::module::ModuleMapper for Cast {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<D>>,
        ) -> burn::module::Param<Tensor<D>> {
            let dtype = self.0;
            param.map(|tensor| tensor.cast(dtype))
        }
    }
    module.map(&mut Cast(dtype))
}

/// A module used as a teacher: kept in validation mode ([`Module::valid`]: no autodiff, no
/// dropout) and fed inputs without autodiff.
#[derive(Debug, Clone)]
pub struct FrozenTeacher<M> {
    module: M,
    /// The precision its weights were cast to (and its float inputs are cast to), if not f32.
    dtype: Option<FloatDType>,
}

impl<M: Module> FrozenTeacher<M> {
    /// Freezes a copy of `module` for teaching.
    pub fn new(module: &M) -> Self {
        Self {
            module: module.valid(),
            dtype: None,
        }
    }

    /// Freezes a copy of `module` with its weights in `dtype` (f16 or bf16: half the memory,
    /// and half the bytes its logits take to the loss). Its float inputs are cast to `dtype`
    /// on the way in; its logits and features come out in `dtype` (the fused losses read them
    /// as they are; the composed losses and the feature terms widen them to f32).
    pub fn in_precision(module: &M, dtype: FloatDType) -> Self {
        Self {
            module: cast_params(module.valid(), dtype),
            dtype: Some(dtype),
        }
    }

    /// The frozen module.
    pub fn module(&self) -> &M {
        &self.module
    }
}

impl<M, I, const D: usize> Teacher<I, D> for FrozenTeacher<M>
where
    M: TappedForward<I, D>,
    I: TeacherInput,
{
    fn teach(&self, input: I, taps: &[&str]) -> Result<TeacherOutput<D>> {
        let input = input.without_autodiff();
        let input = match self.dtype {
            Some(dtype) => input.with_float_dtype(dtype),
            None => input,
        };
        let (logits, features) = self.module.forward_tapped(input);
        Ok(TeacherOutput::new(logits, select_taps(features, taps)?))
    }

    fn num_classes(&self) -> usize {
        self.module.num_classes()
    }

    fn fingerprint(&self) -> Option<Fingerprint> {
        Some(Fingerprint::of_module(&self.module))
    }
}

/// Any module with a forward function as a teacher, without implementing a trait:
/// `FnTeacher::new(&model, 10, |m, x| m.forward(x))`. It has no feature taps.
#[derive(Debug, Clone)]
pub struct FnTeacher<M, F> {
    module: M,
    classes: usize,
    forward: F,
}

impl<M: Module, F> FnTeacher<M, F> {
    /// Freezes a copy of `module` ([`Module::valid`]) with its forward function.
    pub fn new(module: &M, classes: usize, forward: F) -> Self {
        Self {
            module: module.valid(),
            classes,
            forward,
        }
    }
}

impl<M, F, I, const D: usize> Teacher<I, D> for FnTeacher<M, F>
where
    M: Module,
    F: Fn(&M, I) -> Tensor<D>,
    I: TeacherInput,
{
    fn teach(&self, input: I, taps: &[&str]) -> Result<TeacherOutput<D>> {
        let logits = (self.forward)(&self.module, input.without_autodiff());
        Ok(TeacherOutput::new(logits, select_taps(Features::new(), taps)?))
    }

    fn num_classes(&self) -> usize {
        self.classes
    }

    fn fingerprint(&self) -> Option<Fingerprint> {
        Some(Fingerprint::of_module(&self.module))
    }
}
