fn main() {
    outrun::cli::main()
}
