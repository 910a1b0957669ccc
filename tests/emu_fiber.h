// Fibers for the CPU emulations of the GPU kernels (cuda_src/mhc_dynamic_emulate.h, and the Metal
// one, metal_src/check/emulate/metal_stdlib): a GPU thread is a fiber with its own stack, and the
// emulator's scheduler and the fibers switch to each other on one OS thread.
//
// swapcontext saves and restores the signal mask with a system call at every switch, and a kernel with
// barriers switches millions of times a launch: on a VM whose system calls trap to the hypervisor (CI's
// machine in session 59: a swapcontext round trip took 2.3 us, ~1.1 us a call) that was most of the test
// suite's time (4799 s against 1074). On x86-64 ELF a switch pushes the System V ABI's callee-saved
// registers on the old stack and pops them off the new one (the kernels never change MXCSR or the x87
// control word, the rest of the preserved state); elsewhere, or with MHC_EMU_UCONTEXT, ucontext.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <ucontext.h>

#if defined(__x86_64__) && defined(__ELF__) && !defined(MHC_EMU_UCONTEXT)
#define MHC_EMU_FAST_SWITCH 1
extern "C" void mhc_emu_switch(void** save_sp, void* to_sp);  // saves into *save_sp, resumes to_sp
asm(R"(
  .text
  .p2align 4
  .globl mhc_emu_switch
  .hidden mhc_emu_switch
  .type mhc_emu_switch, @function
mhc_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mhc_emu_switch, .-mhc_emu_switch
)");
struct EmuContext {
  void* sp = nullptr;  // the saved stack pointer: six registers, then the address to resume at
};
// Suspends the running context into `from` and resumes `to`.
inline void emu_switch(EmuContext& from, EmuContext& to) { mhc_emu_switch(&from.sp, to.sp); }
#else
struct EmuContext {
  ucontext_t uc;
};
inline void emu_switch(EmuContext& from, EmuContext& to) { swapcontext(&from.uc, &to.uc); }
#endif

// Makes `c` start entry() on the stack [stack, stack + bytes) at the first switch to it. entry must not
// return: it ends by switching away for good.
inline void emu_fiber_init(EmuContext& c, char* stack, size_t bytes, void (*entry)()) {
#ifdef MHC_EMU_FAST_SWITCH
  void** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15));
  *--sp = nullptr;                           // entry's return address (unused): rsp % 16 == 8 at entry, as after a call
  *--sp = reinterpret_cast<void*>(entry);    // where mhc_emu_switch's ret goes
  for (int r = 0; r < 6; ++r) *--sp = nullptr;  // r15, r14, r13, r12, rbx, rbp: a zero rbp ends backtraces
  c.sp = sp;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#endif
}

// Ends the running fiber: resumes `to`, never to come back (the fiber's stack may then be reused).
[[noreturn]] inline void emu_fiber_exit(EmuContext& to) {
  EmuContext gone;
  emu_switch(gone, to);
  __builtin_unreachable();
}
