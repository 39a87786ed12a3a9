fn main() {
    std::process::exit(brdivert::cli::main());
}
