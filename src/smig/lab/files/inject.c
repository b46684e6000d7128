/* A stand-in for a hostile library injected into a hypervisor process with LD_PRELOAD.
 * It does nothing: its presence in the process's executable memory is what AIM must see. */
static volatile int smig_injected_ran;

__attribute__((constructor)) static void smig_injected(void) { smig_injected_ran = 1; }

int smig_injected_marker(void) { return 0x5316 + smig_injected_ran; }
