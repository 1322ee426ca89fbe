int larder_native_answer(void) { return 42; }
