//! CUDA IPC: device buffers that two processes on one host share, so that a gate and an expert
//! worker exchange activations and partial sums GPU to GPU with no host copy of a tensor.
//!
//! The gate allocates every shared buffer ([`SharedBuffer::alloc`], plain `cuMemAlloc` memory:
//! the stream-ordered pool that candle allocates from cannot be exported with
//! `cuIpcGetMemHandle`) and sends each one's 64-byte handle to the worker over gRPC; the worker
//! maps it ([`OpenedBuffer::open`], `cuIpcOpenMemHandle` with lazy peer access, so the same GPU
//! and another GPU of the host both work) and unmaps it on drop with `cuIpcCloseMemHandle`,
//! never freeing it. Tensors go in and out with device-to-device copies on the device's one
//! stream ([`Region::write`], [`Region::read`]); ordering between the two processes is the
//! caller's (the gate service synchronises its stream before it sends a call and the worker
//! synchronises before it replies, so a reply means the data is in place).
//!
//! Who calls it: `services/gate` (remote experts) and `services/expert`. In a build without CUDA
//! nothing here can be constructed: [`SharedBuffer::alloc`] and [`OpenedBuffer::open`] return an
//! error, and callers fall back to the gRPC tensor path.

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

/// Bytes of a CUDA IPC memory handle (`CUipcMemHandle`).
pub const HANDLE_BYTES: usize = 64;

/// Whether this build can share buffers on `device` (a CUDA build and a CUDA device).
pub fn available(device: &Device) -> bool {
    cfg!(feature = "cuda") && matches!(device, Device::Cuda(_))
}

/// Waits until every copy and kernel queued on `device`'s stream has finished (a no-op on the CPU).
pub fn synchronize(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

/// A point in a device's stream: [`Fence::wait`] returns once everything queued before it has
/// run, and nothing queued after it is waited for (unlike a whole-stream synchronise).
pub struct Fence {
    inner: imp::Fence,
}

/// Marks the current end of `device`'s stream (on the CPU, a fence that is always passed).
pub fn fence(device: &Device) -> Result<Fence> {
    Ok(Fence {
        inner: imp::fence(device)?,
    })
}

impl Fence {
    /// Blocks until the work queued before the fence has run.
    pub fn wait(&self) -> Result<()> {
        imp::wait(&self.inner)
    }
}

/// A span of device memory of a known size, in this process's address space.
pub struct Region {
    inner: imp::Region,
}

/// A new handle on `device`'s GPU with a stream of its own (the same CUDA context, so memory of
/// one is usable from the other): for work that must not queue behind the device's other work,
/// such as one gate's device-ordered expert calls on a worker that several gates share.
pub fn stream_device(device: &Device) -> Result<Device> {
    imp::stream_device(device)
}

impl Region {
    /// The same memory, with its copies and flag operations queued on `device`'s stream (a
    /// device of the same GPU, e.g. from [`stream_device`]). The view owns nothing.
    pub fn on(&self, device: &Device) -> Result<Region> {
        Ok(Region {
            inner: imp::on(&self.inner, device)?,
        })
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        imp::bytes(&self.inner)
    }

    /// Queues a copy of contiguous `t` (f32 or bf16, on this region's device) to the start of the
    /// region. Fails, copying nothing, when `t` does not fit.
    pub fn write(&self, t: &Tensor) -> Result<()> {
        self.write_at(0, t)
    }

    /// Queues a copy of contiguous `t` (f32, bf16 or u32) to `offset` bytes into the region.
    pub fn write_at(&self, offset: usize, t: &Tensor) -> Result<()> {
        let need = t.elem_count() * t.dtype().size_in_bytes();
        self.check(offset, need, || {
            format!("a {:?} {:?} tensor", t.dims(), t.dtype())
        })?;
        imp::write(&self.inner, offset, t)
    }

    /// A new tensor of `dtype` and `shape` copied (queued) from the start of the region.
    pub fn read(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.read_at(0, dtype, shape)
    }

    /// A new tensor of `dtype` (f32, bf16 or u32) and `shape` copied (queued) from `offset` bytes
    /// into the region.
    pub fn read_at(&self, offset: usize, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let need = shape.iter().product::<usize>() * dtype.size_in_bytes();
        self.check(offset, need, || format!("a {shape:?} {dtype:?} tensor"))?;
        imp::read(&self.inner, offset, dtype, shape)
    }

    fn check(&self, offset: usize, need: usize, what: impl FnOnce() -> String) -> Result<()> {
        if offset
            .checked_add(need)
            .is_none_or(|end| end > self.bytes())
        {
            return Err(EngineError::InvalidInput(format!(
                "shared buffer: {} of {need} bytes at offset {offset} does not fit in {} bytes",
                what(),
                self.bytes()
            )));
        }
        Ok(())
    }

    fn check_word(&self, word: usize) -> Result<()> {
        self.check(4 * word, 4, || format!("flag word {word}"))
    }

    /// Queues, on the device's stream, the write of `value` to u32 word `word` of the region,
    /// after everything queued before it and with a memory fence, so that a peer that sees the
    /// value also sees the data written before it (`cuStreamWriteValue32`).
    pub fn signal(&self, word: usize, value: u32) -> Result<()> {
        self.check_word(word)?;
        imp::signal(&self.inner, word, value)
    }

    /// Queues, on the device's stream, a wait until u32 word `word` of the region is at least
    /// `value` in the cyclic order (`(i32)(word - value) >= 0`, `cuStreamWaitValue32` GEQ):
    /// nothing queued after it runs before. The host does not block.
    pub fn wait_geq(&self, word: usize, value: u32) -> Result<()> {
        self.check_word(word)?;
        imp::wait_geq(&self.inner, word, value)
    }

    /// The device address of `bytes` bytes at `offset` into the region (checked to fit), for
    /// kernels that read the region where it is ([`crate::cuda::Gpu::add_parts`]).
    pub fn address(&self, offset: usize, bytes: usize) -> Result<u64> {
        self.check(offset, bytes, || format!("{bytes} bytes"))?;
        Ok(imp::address(&self.inner) + offset as u64)
    }

    /// The device address of u32 word `word` of the region (for kernels that write or wait for
    /// a flag: [`crate::cuda::Gpu::signal_words`], [`crate::cuda::Gpu::wait_word`]). The address
    /// is valid while the region (the buffer it views) lives.
    pub fn word_address(&self, word: usize) -> Result<u64> {
        self.check_word(word)?;
        Ok(imp::address(&self.inner) + 4 * word as u64)
    }

    /// Queues a copy of u32 word `word` of this region to word `to_word` of `to`.
    pub fn copy_word(&self, word: usize, to: &Region, to_word: usize) -> Result<()> {
        self.check_word(word)?;
        to.check_word(to_word)?;
        imp::copy_word(&self.inner, word, &to.inner, to_word)
    }

    /// Sets `count` u32 words from `word` to `value` now, on a stream of its own, and returns when
    /// they are written: for zeroing flags before first use, and for releasing waits queued on
    /// the device's stream (which this does not wait for).
    pub fn fill_words_now(&self, word: usize, count: usize, value: u32) -> Result<()> {
        self.check(4 * word, 4 * count, || format!("{count} flag words"))?;
        imp::fill_words(&self.inner, word, count, value)
    }

    /// Reads `count` u32 words from `word` now, on a stream of its own (not ordered with the
    /// device's stream: callers wait for that first).
    pub fn read_words_now(&self, word: usize, count: usize) -> Result<Vec<u32>> {
        self.check(4 * word, 4 * count, || format!("{count} flag words"))?;
        imp::read_words(&self.inner, word, count)
    }
}

/// Device memory this process allocated for another process to map; freed on drop. The peer
/// must have unmapped it (or gone) before then for the memory to be reused.
pub struct SharedBuffer {
    region: Region,
}

impl SharedBuffer {
    /// Allocates `bytes` on CUDA `device` for sharing.
    pub fn alloc(device: &Device, bytes: usize) -> Result<Self> {
        Ok(SharedBuffer {
            region: Region {
                inner: imp::alloc(device, bytes)?,
            },
        })
    }

    /// The IPC handle another process opens with [`OpenedBuffer::open`].
    pub fn handle(&self) -> Result<Vec<u8>> {
        imp::handle(&self.region.inner)
    }
}

impl std::ops::Deref for SharedBuffer {
    type Target = Region;
    fn deref(&self) -> &Region {
        &self.region
    }
}

impl Drop for SharedBuffer {
    fn drop(&mut self) {
        imp::free(&self.region.inner);
    }
}

/// Another process's [`SharedBuffer`], mapped into this one; unmapped (never freed) on drop.
pub struct OpenedBuffer {
    region: Region,
}

impl OpenedBuffer {
    /// Maps the buffer of `bytes` whose handle is `handle` for use on CUDA `device`.
    pub fn open(device: &Device, handle: &[u8], bytes: usize) -> Result<Self> {
        if handle.len() != HANDLE_BYTES {
            return Err(EngineError::InvalidInput(format!(
                "IPC handle of {} bytes (expected {HANDLE_BYTES})",
                handle.len()
            )));
        }
        Ok(OpenedBuffer {
            region: Region {
                inner: imp::open(device, handle, bytes)?,
            },
        })
    }
}

impl std::ops::Deref for OpenedBuffer {
    type Target = Region;
    fn deref(&self) -> &Region {
        &self.region
    }
}

impl Drop for OpenedBuffer {
    fn drop(&mut self) {
        imp::close(&self.region.inner);
    }
}

/// A u32 in pinned host memory that this process's kernels read where it is (a device-mapped
/// host allocation, valid on every GPU of the process), set by the host with a plain store: the
/// release of a gate's device-ordered waits on a worker whose stream failed. No stream op is
/// involved, so a release cannot queue behind the wait it releases (a copy or memset on another
/// stream of the gate can: streams share the GPU's hardware queues). Set once, never reset: a
/// released session is done. Its word returns to the process's pool on drop.
pub struct ReleaseFlag {
    inner: imp::HostWord,
}

impl ReleaseFlag {
    /// A new, unset flag usable by kernels on CUDA `device` (an error without CUDA, or when the
    /// process's pool of such words is used up).
    pub fn new(device: &Device) -> Result<Self> {
        Ok(ReleaseFlag {
            inner: imp::host_word(device)?,
        })
    }

    /// Sets the flag: waits that read it stop within a few microseconds.
    pub fn release(&self) {
        imp::host_word_set(&self.inner, 1);
    }

    /// The flag's device address, for the wait kernels ([`crate::cuda::FlagWait`]).
    pub fn address(&self) -> u64 {
        imp::host_word_address(&self.inner)
    }
}

/// The device address of the process's `waiting` record (in the same pinned block as every
/// [`ReleaseFlag`]; `None` before the first flag is made): while a releasable wait spins, the
/// record names its flag (see [`waiting_on`]).
pub fn waiting_record() -> Option<u64> {
    imp::waiting_record()
}

/// The [`ReleaseFlag::address`] of the releasable wait that is spinning on a GPU of this process
/// now (`None` when none is, or no block was ever made): read by the host while the gate's
/// stream is held, with no stream op.
pub fn waiting_on() -> Option<u64> {
    imp::waiting_on()
}

fn unsupported() -> EngineError {
    EngineError::InvalidInput("CUDA IPC needs a CUDA build and a CUDA device".into())
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, sys};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Device, Storage, Tensor};

    use crate::error::{EngineError, Result};

    /// An event recorded on the stream; `None` on the CPU.
    pub struct Fence(Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>);

    pub fn fence(device: &Device) -> Result<Fence> {
        match device {
            Device::Cuda(d) => Ok(Fence(Some(
                d.cuda_stream()
                    .record_event(None)
                    .map_err(|e| err("record event", e))?,
            ))),
            _ => Ok(Fence(None)),
        }
    }

    pub fn wait(f: &Fence) -> Result<()> {
        match &f.0 {
            Some(e) => e.synchronize().map_err(|e| err("event synchronize", e)),
            None => Ok(()),
        }
    }

    pub struct Region {
        dev: CudaDevice,
        ptr: sys::CUdeviceptr,
        bytes: usize,
    }

    fn err(what: &str, e: impl std::fmt::Display) -> EngineError {
        EngineError::Tensor(candle_core::Error::Msg(format!("CUDA IPC {what}: {e}")))
    }

    fn cuda(device: &Device) -> Result<CudaDevice> {
        match device {
            Device::Cuda(d) => Ok(d.clone()),
            _ => Err(super::unsupported()),
        }
    }

    fn bind(dev: &CudaDevice) -> Result<()> {
        dev.cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| err("bind context", e))
    }

    pub fn bytes(r: &Region) -> usize {
        r.bytes
    }

    pub fn address(r: &Region) -> u64 {
        r.ptr
    }

    pub fn on(r: &Region, device: &Device) -> Result<Region> {
        Ok(Region {
            dev: cuda(device)?,
            ptr: r.ptr,
            bytes: r.bytes,
        })
    }

    pub fn stream_device(device: &Device) -> Result<Device> {
        let dev = cuda(device)?;
        let ordinal = dev.cuda_stream().context().ordinal();
        let other = Device::new_cuda_with_stream(ordinal)?;
        if let Device::Cuda(d) = &other {
            // SAFETY: as for the process's main device (services/common/src/device.rs): every
            // tensor made on this device is used on its one stream, or on another stream only
            // after the work that wrote it is known to be done.
            unsafe { d.disable_event_tracking() };
        }
        Ok(other)
    }

    pub fn alloc(device: &Device, bytes: usize) -> Result<Region> {
        let dev = cuda(device)?;
        bind(&dev)?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: the context of `dev` is current on this thread (bind above); cuMemAlloc writes
        // one device address into `ptr`, which we own until `free`.
        unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes.max(1)) }
            .result()
            .map_err(|e| err(&format!("cuMemAlloc of {bytes} bytes"), e))?;
        Ok(Region { dev, ptr, bytes })
    }

    pub fn free(r: &Region) {
        if bind(&r.dev).is_err() {
            return;
        }
        // Work queued on the stream may still read or write the buffer.
        let _ = r.dev.cuda_stream().synchronize();
        // SAFETY: `ptr` came from cuMemAlloc in `alloc` and is freed once, here (Drop).
        let _ = unsafe { sys::cuMemFree_v2(r.ptr) };
    }

    pub fn handle(r: &Region) -> Result<Vec<u8>> {
        bind(&r.dev)?;
        let mut h = sys::CUipcMemHandle_st { reserved: [0; 64] };
        // SAFETY: `ptr` is the base of a live cuMemAlloc allocation; the handle is plain bytes.
        unsafe { sys::cuIpcGetMemHandle(&mut h, r.ptr) }
            .result()
            .map_err(|e| err("cuIpcGetMemHandle", e))?;
        Ok(h.reserved.iter().map(|&c| c as u8).collect())
    }

    pub fn open(device: &Device, handle: &[u8], bytes: usize) -> Result<Region> {
        let dev = cuda(device)?;
        bind(&dev)?;
        let mut h = sys::CUipcMemHandle_st { reserved: [0; 64] };
        for (d, &s) in h.reserved.iter_mut().zip(handle) {
            *d = s as core::ffi::c_char;
        }
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: the context is current (bind above); the driver validates the handle and
        // writes a mapped address into `ptr`, which `close` unmaps once.
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        }
        .result()
        .map_err(|e| err("cuIpcOpenMemHandle", e))?;
        Ok(Region { dev, ptr, bytes })
    }

    pub fn close(r: &Region) {
        if bind(&r.dev).is_err() {
            return;
        }
        let _ = r.dev.cuda_stream().synchronize();
        // SAFETY: `ptr` came from cuIpcOpenMemHandle in `open` and is closed once, here (Drop);
        // an opened pointer is never freed.
        let _ = unsafe { sys::cuIpcCloseMemHandle(r.ptr) };
    }

    /// The device address of contiguous `t`'s first element on `dev`.
    fn tensor_ptr(dev: &CudaDevice, t: &Tensor) -> Result<sys::CUdeviceptr> {
        if !t.is_contiguous() {
            return Err(err("copy", "tensor is not contiguous"));
        }
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(err("copy", "tensor is not on a CUDA device"));
        };
        let stream = dev.cuda_stream();
        // The guards only record events when cudarc tracks them; moemesh runs one stream per
        // device with tracking off (services/common/src/device.rs), and every copy here is
        // queued on that stream, ordered with the tensor's other uses and its free.
        let base = match &cs.slice {
            CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
            CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
            CudaStorageSlice::U32(s) => s.device_ptr(&stream).0,
            _ => return Err(err("copy", format!("dtype {:?}", cs.dtype()))),
        };
        Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
    }

    fn copy(
        dev: &CudaDevice,
        dst: sys::CUdeviceptr,
        src: sys::CUdeviceptr,
        n: usize,
    ) -> Result<()> {
        bind(dev)?;
        let stream = dev.cuda_stream();
        // SAFETY: both spans hold at least `n` bytes (checked by the callers against the region
        // size and the tensor's element count) and stay alive until the copy has run: tensors
        // are freed in stream order, regions are unmapped or freed only after a synchronise.
        unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, n, stream.cu_stream()) }
            .result()
            .map_err(|e| err("cuMemcpyDtoDAsync", e))
    }

    pub fn write(r: &Region, offset: usize, t: &Tensor) -> Result<()> {
        let src = tensor_ptr(&r.dev, t)?;
        copy(
            &r.dev,
            r.ptr + offset as u64,
            src,
            t.elem_count() * t.dtype().size_in_bytes(),
        )
    }

    pub fn read(r: &Region, offset: usize, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let n = shape.iter().product::<usize>().max(1);
        let dev = &r.dev;
        // SAFETY: the copy below fills all `n` elements before anything reads the tensor (same
        // stream).
        let storage = unsafe {
            match dtype {
                DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
                DType::BF16 => {
                    CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(n)?, dev.clone())
                }
                DType::U32 => CudaStorage::wrap_cuda_slice(dev.alloc::<u32>(n)?, dev.clone()),
                other => return Err(err("read", format!("dtype {other:?}"))),
            }
        };
        let t = Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false);
        let dst = tensor_ptr(dev, &t)?;
        copy(dev, dst, r.ptr + offset as u64, n * dtype.size_in_bytes())?;
        Ok(t)
    }

    pub fn signal(r: &Region, word: usize, value: u32) -> Result<()> {
        bind(&r.dev)?;
        let stream = r.dev.cuda_stream();
        // SAFETY: the word lies inside the live region (checked by the caller); the write is
        // queued on the device's stream, which outlives the call.
        unsafe {
            sys::cuStreamWriteValue32_v2(
                stream.cu_stream(),
                r.ptr + 4 * word as u64,
                value,
                sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
            )
        }
        .result()
        .map_err(|e| err("cuStreamWriteValue32", e))
    }

    pub fn wait_geq(r: &Region, word: usize, value: u32) -> Result<()> {
        bind(&r.dev)?;
        let stream = r.dev.cuda_stream();
        // SAFETY: as for `signal`; the wait reads the word until the condition holds.
        unsafe {
            sys::cuStreamWaitValue32_v2(
                stream.cu_stream(),
                r.ptr + 4 * word as u64,
                value,
                sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
            )
        }
        .result()
        .map_err(|e| err("cuStreamWaitValue32", e))
    }

    pub fn copy_word(r: &Region, word: usize, to: &Region, to_word: usize) -> Result<()> {
        copy(
            &r.dev,
            to.ptr + 4 * to_word as u64,
            r.ptr + 4 * word as u64,
            4,
        )
    }

    /// Runs `f` on a new non-blocking stream of `r`'s context, synchronises it and destroys it.
    fn on_side_stream(
        r: &Region,
        what: &str,
        f: impl FnOnce(sys::CUstream) -> sys::CUresult,
    ) -> Result<()> {
        bind(&r.dev)?;
        let mut s: sys::CUstream = std::ptr::null_mut();
        // SAFETY: the context is current (bind above); the driver writes a new stream into `s`,
        // destroyed below.
        unsafe { sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) }
            .result()
            .map_err(|e| err("cuStreamCreate", e))?;
        let queued = f(s).result().map_err(|e| err(what, e));
        // SAFETY: `s` is the stream created above, synchronised and then destroyed once.
        let synced = unsafe { sys::cuStreamSynchronize(s) }
            .result()
            .map_err(|e| err("cuStreamSynchronize", e));
        // SAFETY: as above.
        let _ = unsafe { sys::cuStreamDestroy_v2(s) };
        queued.and(synced)
    }

    /// Pinned, device-mapped host words, made once (at the first session) and kept for the
    /// process's life: word 0 is the `waiting` record, the others are [`HostWord`]s.
    struct HostBlock {
        host: *mut u32,
        device: u64,
        /// Words returned by dropped flags, reused first.
        free: Vec<usize>,
        /// The next never-used word.
        next: usize,
    }

    // SAFETY: `host` is pinned host memory owned by the process for its whole life; the words
    // are accessed through atomics (host) and by kernels (device).
    unsafe impl Send for HostBlock {}

    const HOST_WORDS: usize = 4096;

    static HOST_BLOCK: std::sync::Mutex<Option<HostBlock>> = std::sync::Mutex::new(None);

    /// The block's device address once it is made (read by every wait launch, without the lock).
    static RECORD: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

    fn host_block(device: &Device) -> Result<std::sync::MutexGuard<'static, Option<HostBlock>>> {
        let mut block = HOST_BLOCK.lock().unwrap_or_else(|e| e.into_inner());
        if block.is_none() {
            bind(&cuda(device)?)?;
            let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: the context is current (bind above); the driver writes a pointer to
            // `4 · HOST_WORDS` bytes of pinned memory, mapped into every context's address space
            // (PORTABLE | DEVICEMAP), into `p`; it is never freed.
            unsafe {
                sys::cuMemHostAlloc(
                    &mut p,
                    4 * HOST_WORDS,
                    sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP,
                )
            }
            .result()
            .map_err(|e| err("cuMemHostAlloc", e))?;
            // SAFETY: `p` points to 4 · HOST_WORDS writable bytes (above), zeroed before use.
            unsafe { std::ptr::write_bytes(p.cast::<u32>(), 0, HOST_WORDS) };
            let mut d: sys::CUdeviceptr = 0;
            // SAFETY: `p` is a mapped pinned allocation of this process (above).
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut d, p, 0) }
                .result()
                .map_err(|e| err("cuMemHostGetDevicePointer", e))?;
            *block = Some(HostBlock {
                host: p.cast(),
                device: d,
                free: Vec::new(),
                next: 1,
            });
            let _ = RECORD.set(d);
        }
        Ok(block)
    }

    /// One word of the block (never word 0).
    pub struct HostWord {
        word: &'static std::sync::atomic::AtomicU32,
        index: usize,
        device: u64,
    }

    fn atomic_at(host: *mut u32, index: usize) -> &'static std::sync::atomic::AtomicU32 {
        // SAFETY: `index` < HOST_WORDS, so the word lies in the block, which lives (pinned, never
        // freed) for the process's life; u32 and AtomicU32 have the same layout.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(host.add(index)) }
    }

    pub fn host_word(device: &Device) -> Result<HostWord> {
        let mut guard = host_block(device)?;
        let Some(b) = guard.as_mut() else {
            return Err(err("host words", "no block"));
        };
        let index = match b.free.pop() {
            Some(i) => i,
            None if b.next < HOST_WORDS => {
                b.next += 1;
                b.next - 1
            }
            None => {
                return Err(err(
                    "host words",
                    format!("all {} release flags are in use", HOST_WORDS - 1),
                ));
            }
        };
        let word = atomic_at(b.host, index);
        word.store(0, std::sync::atomic::Ordering::SeqCst);
        Ok(HostWord {
            word,
            index,
            device: b.device + 4 * index as u64,
        })
    }

    pub fn host_word_set(w: &HostWord, value: u32) {
        w.word.store(value, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn host_word_address(w: &HostWord) -> u64 {
        w.device
    }

    impl Drop for HostWord {
        fn drop(&mut self) {
            let mut guard = HOST_BLOCK.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(b) = guard.as_mut() {
                b.free.push(self.index);
            }
        }
    }

    pub fn waiting_record() -> Option<u64> {
        RECORD.get().copied()
    }

    pub fn waiting_on() -> Option<u64> {
        let guard = HOST_BLOCK.lock().unwrap_or_else(|e| e.into_inner());
        let b = guard.as_ref()?;
        let index = atomic_at(b.host, 0).load(std::sync::atomic::Ordering::SeqCst) as usize;
        (index != 0 && index < HOST_WORDS).then(|| b.device + 4 * index as u64)
    }

    pub fn fill_words(r: &Region, word: usize, count: usize, value: u32) -> Result<()> {
        on_side_stream(r, "cuMemsetD32Async", |s| {
            // SAFETY: the words lie inside the live region (checked by the caller).
            unsafe { sys::cuMemsetD32Async(r.ptr + 4 * word as u64, value, count, s) }
        })
    }

    /// A stream and a pinned buffer per GPU for reading flag words back (the gate's check of
    /// every step's calls): made once, so that a read is one copy into pinned memory and one
    /// stream synchronisation, with no stream made and destroyed and no pageable staging.
    struct Reader {
        ordinal: usize,
        stream: sys::CUstream,
        host: *mut u32,
    }

    // SAFETY: a Reader's stream and pinned buffer are only used under READERS' lock.
    unsafe impl Send for Reader {}

    /// Words a [`Reader`] takes at once (larger reads take a stream of their own).
    const READER_WORDS: usize = 16_384;

    static READERS: std::sync::Mutex<Vec<Reader>> = std::sync::Mutex::new(Vec::new());

    /// `count` words at `word` through this GPU's reader; `None` when it has none and cannot
    /// make one (the caller reads the other way).
    fn read_pinned(r: &Region, word: usize, count: usize) -> Result<Option<Vec<u32>>> {
        if count > READER_WORDS {
            return Ok(None);
        }
        bind(&r.dev)?;
        let ordinal = r.dev.cuda_stream().context().ordinal();
        let mut readers = READERS.lock().unwrap_or_else(|e| e.into_inner());
        if !readers.iter().any(|x| x.ordinal == ordinal) {
            let mut stream: sys::CUstream = std::ptr::null_mut();
            // SAFETY: the context is current (bind above); the driver writes a new stream into
            // `stream`, kept for the process's life.
            let made = unsafe {
                sys::cuStreamCreate(
                    &mut stream,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                )
            };
            if made.result().is_err() {
                return Ok(None);
            }
            let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: the context is current; the driver writes a pointer to `4 · READER_WORDS`
            // bytes of pinned host memory into `p`, kept for the process's life.
            let pinned = unsafe { sys::cuMemHostAlloc(&mut p, 4 * READER_WORDS, 0) };
            if pinned.result().is_err() {
                // SAFETY: `stream` was made above and is not used elsewhere.
                let _ = unsafe { sys::cuStreamDestroy_v2(stream) };
                return Ok(None);
            }
            readers.push(Reader {
                ordinal,
                stream,
                host: p.cast(),
            });
        }
        let Some(reader) = readers.iter().find(|x| x.ordinal == ordinal) else {
            return Ok(None);
        };
        // SAFETY: the pinned buffer holds READER_WORDS ≥ count u32 and is only used under the
        // lock held here; the words lie inside the live region; the copy is waited for below.
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                reader.host.cast(),
                r.ptr + 4 * word as u64,
                4 * count,
                reader.stream,
            )
        }
        .result()
        .map_err(|e| err("cuMemcpyDtoHAsync", e))?;
        // SAFETY: the reader's stream, made above.
        unsafe { sys::cuStreamSynchronize(reader.stream) }
            .result()
            .map_err(|e| err("cuStreamSynchronize", e))?;
        // SAFETY: the copy above wrote `count` words there and has completed.
        Ok(Some(
            unsafe { std::slice::from_raw_parts(reader.host, count) }.to_vec(),
        ))
    }

    pub fn read_words(r: &Region, word: usize, count: usize) -> Result<Vec<u32>> {
        if let Some(words) = read_pinned(r, word, count)? {
            return Ok(words);
        }
        let mut out = vec![0u32; count];
        let dst = out.as_mut_ptr();
        on_side_stream(r, "cuMemcpyDtoHAsync", |s| {
            // SAFETY: `out` holds `count` u32 and outlives the copy (synchronised before
            // `on_side_stream` returns); the words lie inside the live region.
            unsafe { sys::cuMemcpyDtoHAsync_v2(dst.cast(), r.ptr + 4 * word as u64, 4 * count, s) }
        })?;
        Ok(out)
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{DType, Device, Tensor};

    use crate::error::Result;

    /// Uninhabited: a build without CUDA never has a shared region.
    pub enum Region {}

    /// Nothing to wait for without a GPU.
    pub struct Fence;

    pub fn fence(_device: &Device) -> Result<Fence> {
        Ok(Fence)
    }

    pub fn wait(_f: &Fence) -> Result<()> {
        Ok(())
    }

    pub fn bytes(r: &Region) -> usize {
        match *r {}
    }

    pub fn on(r: &Region, _device: &Device) -> Result<Region> {
        match *r {}
    }

    pub fn stream_device(_device: &Device) -> Result<Device> {
        Err(super::unsupported())
    }

    pub fn alloc(_device: &Device, _bytes: usize) -> Result<Region> {
        Err(super::unsupported())
    }

    pub fn free(r: &Region) {
        match *r {}
    }

    pub fn handle(r: &Region) -> Result<Vec<u8>> {
        match *r {}
    }

    pub fn open(_device: &Device, _handle: &[u8], _bytes: usize) -> Result<Region> {
        Err(super::unsupported())
    }

    pub fn close(r: &Region) {
        match *r {}
    }

    pub fn write(r: &Region, _offset: usize, _t: &Tensor) -> Result<()> {
        match *r {}
    }

    pub fn read(r: &Region, _offset: usize, _dtype: DType, _shape: &[usize]) -> Result<Tensor> {
        match *r {}
    }

    pub fn address(r: &Region) -> u64 {
        match *r {}
    }

    pub fn signal(r: &Region, _word: usize, _value: u32) -> Result<()> {
        match *r {}
    }

    pub fn wait_geq(r: &Region, _word: usize, _value: u32) -> Result<()> {
        match *r {}
    }

    pub fn copy_word(r: &Region, _word: usize, _to: &Region, _to_word: usize) -> Result<()> {
        match *r {}
    }

    pub fn fill_words(r: &Region, _word: usize, _count: usize, _value: u32) -> Result<()> {
        match *r {}
    }

    pub fn read_words(r: &Region, _word: usize, _count: usize) -> Result<Vec<u32>> {
        match *r {}
    }

    /// Uninhabited: a build without CUDA never has a release flag.
    pub enum HostWord {}

    pub fn host_word(_device: &Device) -> Result<HostWord> {
        Err(super::unsupported())
    }

    pub fn host_word_set(w: &HostWord, _value: u32) {
        match *w {}
    }

    pub fn host_word_address(w: &HostWord) -> u64 {
        match *w {}
    }

    pub fn waiting_record() -> Option<u64> {
        None
    }

    pub fn waiting_on() -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_shared_buffers_on_the_cpu() {
        assert!(!available(&Device::Cpu));
        assert!(SharedBuffer::alloc(&Device::Cpu, 1024).is_err());
        assert!(OpenedBuffer::open(&Device::Cpu, &[0; HANDLE_BYTES], 1024).is_err());
        assert!(OpenedBuffer::open(&Device::Cpu, &[0; 3], 1024).is_err());
        assert!(ReleaseFlag::new(&Device::Cpu).is_err());
        assert_eq!(waiting_record(), None);
        assert_eq!(waiting_on(), None);
        fence(&Device::Cpu)
            .and_then(|f| f.wait())
            .expect("a CPU fence is always passed");
    }
}
